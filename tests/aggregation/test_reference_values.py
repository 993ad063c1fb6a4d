"""Every deterministic torchjd reference record is reproduced by jdoptim.

Tolerances (spec §5.1): float32 within 2e-5 and float64 within 1e-6, relative to max(1, |ref|).
A float32 result is also accepted when it matches the float64 reference to 2e-5 (jdoptim solves
the small m x m problems in float64, so it can be *more* exact than torchjd's float32 path).
Records flagged ``fragile`` (ill-conditioned in float32) are compared with the float64 reference
at 1e-2. The convex-program methods get the solver tolerances of the spec (CAGrad 1e-5,
NashMTL 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import Aggregator

from .reference import DTYPES, build, float64_twin, input_matrix, record_id, records

# CLARABEL (torchjd's CAGrad solver) stops at a relative gap of 1e-8, which leaves these flat
# problems visibly away from the exact optimum (J_base, c=1: exact weights [1.2, 0.8], reference
# [1.199979, 0.799968]; J_Krum, c=0.5: w_4 exact 2.906513, reference 2.914860). jdoptim's solver
# finds the exact, KKT-verified optimum (tests/aggregation/test_cagrad.py pins it to 3e-7), so
# these records are compared at the reference's own accuracy.
_INEXACT_REFERENCE = {
    ("CAGrad(c=1.0)", "J_base"): 2e-4,
    ("CAGrad(c=0.5)", "J_Krum"): 5e-3,
    ("CAGradWeighting(c=0.5)", "J_Krum"): 5e-3,
}

# Fragile records whose float32 *Gramian* already fixes the answer: G = J J^T of J_TrimmedMean in
# float32 is off by up to 1.9e14 on entries of 1e22, while the float64 min-norm point has
# w^T G w ~ 0.1, so no weighting fed that G can recover the float64 optimum. jdoptim's MGDA
# (float64 Frank-Wolfe on the given G) reproduces torchjd's float32 record instead.
_FLOAT32_GRAMIAN_BOUND = {
    ("MGDA()", "J_TrimmedMean"),
    ("MGDA(epsilon=0.1, max_iters=3)", "J_TrimmedMean"),
    ("MGDAWeighting()", "J_TrimmedMean"),
}


def _tolerance(r: dict) -> float:
    ctor = r["ctor"]
    if ctor.startswith("NashMTL"):
        return 1e-4
    if (ctor, r.get("input")) in _INEXACT_REFERENCE:
        return _INEXACT_REFERENCE[(ctor, r.get("input"))]
    if ctor.startswith("CAGrad"):
        return 2e-5 if r["dtype"] == "float32" else 1e-5
    return 2e-5 if r["dtype"] == "float32" else 1e-6


def _close(actual: torch.Tensor, expected: list, tol: float) -> bool:
    exp = torch.tensor(expected, dtype=torch.float64)
    act = actual.detach().to(torch.float64).reshape(exp.shape)
    scale = torch.clamp(exp.abs(), min=1.0)
    return bool(((act - exp).abs() <= tol * scale).all())


def _run(r: dict):
    dtype = DTYPES[r["dtype"]]
    if r.get("rng_dependent"):
        torch.manual_seed(0)
    obj = build(r["ctor"], dtype)
    J = input_matrix(r["input"], dtype)
    captured = {}
    if isinstance(obj, Aggregator) and hasattr(obj, "weighting"):
        obj.weighting.register_forward_hook(lambda _m, _i, out: captured.setdefault("w", out))
    if r["kind"] == "weighting":
        return obj(J @ J.T), None
    return obj(J), captured.get("w")


DETERMINISTIC = [
    r for r in records() if r["section"] in ("a", "b") and r["kind"] in ("aggregator", "weighting")
]


@pytest.mark.parametrize("r", DETERMINISTIC, ids=record_id)
def test_reference_record(r: dict) -> None:
    if r["error"]:
        exc_type = r["error"].split(":")[0]
        with pytest.raises(Exception) as info:
            _run(r)
        assert type(info.value).__name__ == exc_type or isinstance(info.value, ValueError)
        return
    output, weights = _run(r)
    tol = _tolerance(r)
    candidates = []
    twin = float64_twin(r) if r["dtype"] == "float32" else None
    if r.get("fragile"):
        assert twin is not None
        candidates.append((twin, 1e-2))
        if (r["ctor"], r.get("input")) in _FLOAT32_GRAMIAN_BOUND:
            candidates.append((r, tol))
    else:
        candidates.append((r, tol))
        if twin is not None and not twin.get("error"):
            candidates.append((twin, tol))
    ok = any(_close(output, ref["output_sig10"], t) for ref, t in candidates)
    assert ok, f"output {output.tolist()} vs reference {r['output_sig10']}"
    if weights is not None and r.get("weights_sig10") is not None:
        ok = any(
            _close(weights, ref["weights_sig10"], t)
            for ref, t in candidates
            if ref.get("weights_sig10") is not None
        )
        assert ok, f"weights {weights.tolist()} vs reference {r['weights_sig10']}"
    assert output.dtype == DTYPES[r["dtype"]]


EDGE = records("edge")


@pytest.mark.parametrize("r", EDGE, ids=record_id)
def test_edge_record(r: dict) -> None:
    """Edge inputs: bad shapes, no rows and non-finite entries raise ValueError (jdoptim's rule);
    everything else behaves as torchjd (same output, or the same error)."""
    name = r["input"]
    must_raise_value_error = name in (
        "vector_3",
        "tensor_2x2x2",
        "no_rows_0x3",
        "nan_entry",
        "inf_entry",
    )
    if must_raise_value_error:
        with pytest.raises(ValueError):
            _run(r)
        return
    if r["error"]:
        exc_type = r["error"].split(":")[0]
        with pytest.raises(Exception) as info:
            _run(r)
        assert type(info.value).__name__ == exc_type or isinstance(info.value, ValueError)
        return
    output, _ = _run(r)
    assert _close(output, r["output"], 2e-5), f"{output.tolist()} vs {r['output']}"


STATEFUL = records("stateful")


@pytest.mark.parametrize("r", STATEFUL, ids=lambda r: f"{r['ctor']}|{r['dtype']}")
def test_stateful_sequence(r: dict) -> None:
    dtype = DTYPES[r["dtype"]]
    obj = build(r["ctor"], dtype)
    J = input_matrix(r["J"], dtype)
    env = {"J": J, "tensor": lambda d: torch.tensor(d, dtype=dtype), "torch": torch}
    tol = 1e-4 if r["ctor"].startswith("NashMTL") else 2e-5
    captured = []
    if isinstance(obj, Aggregator) and hasattr(obj, "weighting"):
        obj.weighting.register_forward_hook(lambda _m, _i, out: captured.append(out))
    for k, expr in enumerate(r["inputs_sequence"]):
        Jk = eval(expr, env)
        out = obj(Jk @ Jk.T) if r["applied_to"] != "Jk" and "Weighting" in r["ctor"] else obj(Jk)
        assert _close(out, r["outputs"][k], tol), (k, out.tolist(), r["outputs"][k])
        if captured and r["weights"] and "Weighting" not in r["ctor"]:
            assert _close(captured[-1], r["weights"][k], tol), (k, captured[-1].tolist())


def _repr_expectations() -> list[tuple[str, dict]]:
    from .reference import load

    reprs = load()["reprs"]
    out = dict(reprs["torchjd-pr529-stch"])
    for ctor, value in reprs["torchjd-0.18.0"].items():
        if ctor.startswith("CAGrad("):  # 0.18 strips ".0" rather than every trailing "0"
            out[ctor] = value
    return sorted(out.items())


@pytest.mark.parametrize("item", _repr_expectations(), ids=lambda it: it[0])
def test_repr_and_str(item: tuple[str, dict]) -> None:
    ctor, expected = item
    obj = build(ctor, torch.float32)
    exp_repr = expected["repr"].replace("solver='quadprog'", "solver='torch'")
    # jdoptim's default norm_eps is None (a scale-invariant threshold, see
    # jdoptim.solvers.normalization) where torchjd's is the absolute 1e-4.
    exp_repr = exp_repr.replace("norm_eps=0.0001", "norm_eps=None")
    actual_repr = repr(obj)
    if "0x..." in exp_repr:
        prefix = exp_repr.split("0x...")[0]
        assert actual_repr.startswith(prefix)
    else:
        assert actual_repr == exp_repr
    assert str(obj) == expected["str"]
