"""The README's Python code runs as written, and its commands name the real entry points."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should have a quick start"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    weights = namespace["weights"]
    assert weights.shape == (3,)


def test_readme_commands_match_ci_and_the_demo() -> None:
    text = README.read_text()
    assert "python -m pytest" in text
    assert "python -m jdoptim.demo" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest" in ci and "torch==2.13.0" in ci
