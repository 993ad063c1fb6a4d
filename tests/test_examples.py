"""Run every script of ``examples/`` (small sizes; each checks what it shows with asserts)."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))

# Keyword arguments for `main()` that keep the test quick. The compile example is exercised with
# the aot_eager backend (same Dynamo capture, no inductor code generation: ~3 s instead of ~15 s
# on a 2-core CPU); `python examples/compile_train_step.py` runs it with inductor.
OVERRIDES: dict[str, dict[str, object]] = {
    "compile_train_step": {"backend": "aot_eager", "steps": 3},
    "distributed": {"steps": 4},  # launches torchrun with 2 gloo ranks
    "lightning_manual": {"max_epochs": 1, "n_samples": 64},
    "hf_accelerate": {"epochs": 1, "n_samples": 64},
}
# Optional libraries of the `test` extra: without them an example only prints how to install
# them, so the test fails instead of passing vacuously.
NEEDS: dict[str, str] = {"lightning_manual": "lightning", "hf_accelerate": "accelerate"}


def test_the_examples_are_found():
    assert len(SCRIPTS) >= 11
    assert {"basic_usage", "iwrm", "partial_jd", "compile_train_step", "amp"} <= {
        s.stem for s in SCRIPTS
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_example_runs(script: Path, capsys: pytest.CaptureFixture[str]):
    needed = NEEDS.get(script.stem)
    if needed is not None:
        assert importlib.util.find_spec(needed), f"{needed} is in the test extra: install it"
    namespace = runpy.run_path(str(script))  # defines main() without running it
    torch._dynamo.reset()
    try:
        namespace["main"](**OVERRIDES.get(script.stem, {}))
    finally:
        torch._dynamo.reset()
    assert capsys.readouterr().out.strip(), "every example reports what it did"
