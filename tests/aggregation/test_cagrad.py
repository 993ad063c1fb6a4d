"""Tests of CAGrad / CAGradWeighting (the compile capture is in test_compile.py)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import CAGrad, CAGradWeighting, Mean
from jdoptim.aggregation._gramian import normalize

torch.set_num_threads(1)

J_BASE = [[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]
J_KRUM = [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0], [1.0, 2.0, 3.0], [2.0, 0.0, 1.0]]
J_TRIMMED_MEAN = [[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]]


def _random_jacobian(seed: int, m: int, n: int, conflict: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    if conflict:
        J[0] = -J[1] + 0.3 * J[0]
    return J


def _check_kkt(G: torch.Tensor, weights: torch.Tensor, c: float, tol: float = 1e-8) -> None:
    """Optimality of CAGrad's primal, max_d min_i <g_i, d> s.t. ||d - g0|| <= c ||g0||, in the
    normalised geometry: u = weights - 1/m >= 0 is supported where (G_n weights)_i is minimal,
    and ||J_n^T u|| = c ||g0||."""
    m = G.shape[0]
    Gn = normalize(G.double(), 1e-4)
    v = weights.double()
    u = v - 1.0 / m
    phi = c * float(Gn.sum().sqrt()) / m
    scores = Gn @ v  # <g_i, d> in the normalised geometry
    assert bool((u >= -tol * v.abs().max()).all())
    assert abs(float((u @ Gn @ u).sqrt()) - phi) < tol * max(1.0, phi)
    gap = scores - scores.min()
    assert float((gap * u.clamp(min=0)).abs().max()) < tol * float(v.abs().max())


# Exact optima of two records where torchjd's CLARABEL reference is visibly inexact, from a
# 50-digit active-set solution of the KKT system (support and multiplier checked by hand).
EXACT = [
    (J_BASE, 1.0, [1.2, 0.8]),
    (J_KRUM, 0.5, [33.3159663619135, 0.2, 0.2, 2.906512614282437, 0.2]),
]


@pytest.mark.parametrize(("J", "c", "expected"), EXACT)
def test_matches_exact_optimum(J, c: float, expected: list) -> None:
    J = torch.tensor(J, dtype=torch.float64)
    weights = CAGradWeighting(c)(J @ J.T)
    torch.testing.assert_close(
        weights, torch.tensor(expected, dtype=torch.float64), rtol=3e-7, atol=1e-7
    )


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("c", [0.25, 0.5, 0.9, 2.0])
def test_kkt_on_random_gramians(m: int, c: float) -> None:
    J = _random_jacobian(m * 7 + int(c * 4), m, 2 * m + 3, conflict=m > 1)
    G = J @ J.T
    weights = CAGradWeighting(c)(G)
    assert bool(weights.abs().sum() > 0)
    _check_kkt(G, weights, c)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(2, 6),
    c=st.floats(0.05, 0.95),
    scale=st.floats(1e-3, 1e3),
)
def test_kkt_invariances(seed: int, m: int, c: float, scale: float) -> None:
    J = _random_jacobian(seed, m, m + 2)
    G = J @ J.T
    weighting = CAGradWeighting(c)
    weights = weighting(G)
    _check_kkt(G, weights, c, tol=1e-7)
    # Scale invariance (the Gramian is normalised) and permutation equivariance.
    torch.testing.assert_close(weighting(scale * G), weights, rtol=1e-7, atol=1e-8)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(weighting(G[perm][:, perm]), weights[perm], rtol=1e-7, atol=1e-8)


def test_special_cases() -> None:
    J = _random_jacobian(0, 4, 6)
    torch.testing.assert_close(CAGrad(0.0)(J), Mean()(J))
    one_row = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(CAGrad(0.5)(one_row), torch.tensor([1.5, 3.0, 4.5]))
    torch.testing.assert_close(CAGradWeighting(0.5)(torch.zeros(3, 3)), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pareto_stationary_point_with_large_c_gives_zero(dtype: torch.dtype) -> None:
    # 0 is in the convex hull of the rows: for c >= 1 the optimal update is d = 0.
    J = torch.tensor(J_TRIMMED_MEAN, dtype=dtype)
    for c in (1.0, 2.0):
        out = CAGrad(c)(J)
        assert out.dtype == dtype
        torch.testing.assert_close(out, torch.zeros(2, dtype=dtype))
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=dtype)
    torch.testing.assert_close(CAGrad(1.5)(J), torch.zeros(2, dtype=dtype))


def test_dtype_and_no_grad() -> None:
    J = _random_jacobian(1, 3, 5).float().requires_grad_()
    out = CAGrad(0.5)(J)
    assert out.dtype == torch.float32 and not out.requires_grad
    w = CAGradWeighting(0.5)((J @ J.T).detach().requires_grad_())
    assert w.dtype == torch.float32 and not w.requires_grad


def test_validation_repr_and_str() -> None:
    with pytest.raises(ValueError, match="c must be non-negative, but got -1.0"):
        CAGrad(-1.0)
    with pytest.raises(ValueError, match="norm_eps must be non-negative, but got -0.1"):
        CAGradWeighting(0.5, norm_eps=-0.1)
    with pytest.raises(ValueError, match="solver must be one of"):
        CAGrad(0.5, solver="scs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        CAGradWeighting(0.5)(torch.ones(2, 3))
    assert repr(CAGrad(c=0.5)) == "CAGrad(c=0.5, norm_eps=None)"
    assert repr(CAGradWeighting(c=0.5)) == "CAGradWeighting()"
    assert [str(CAGrad(c)) for c in (0.0, 0.5, 1.0, 2.0, 0.25)] == [
        "CAGrad0",
        "CAGrad0.5",
        "CAGrad1",
        "CAGrad2",
        "CAGrad0.25",
    ]


needs_cvxpy = pytest.mark.skipif(
    importlib.util.find_spec("cvxpy") is None or importlib.util.find_spec("clarabel") is None,
    reason="cvxpy/clarabel not installed",
)


@needs_cvxpy
def test_cvxpy_solver_reproduces_torchjd() -> None:
    aggregator = CAGrad(0.5, solver="cvxpy")
    assert repr(aggregator) == "CAGrad(c=0.5, norm_eps=None, solver='cvxpy')"
    J = torch.tensor(J_KRUM, dtype=torch.float64)
    # torchjd 0.18's numbers (CLARABEL with default tolerances), to 10 significant digits.
    expected = [51.81374107, -94.07140153, 47.0434607]
    torch.testing.assert_close(aggregator(J), torch.tensor(expected, dtype=torch.float64))


@needs_cvxpy
@pytest.mark.parametrize("seed", range(4))
def test_torch_solver_agrees_with_cvxpy(seed: int) -> None:
    J = _random_jacobian(seed, 6, 9)
    G = J @ J.T
    exact = CAGradWeighting(0.5)(G)
    reference = CAGradWeighting(0.5, solver="cvxpy")(G)
    # CLARABEL is accurate to ~1e-5 here; the torch solver satisfies KKT to 1e-8.
    np.testing.assert_allclose(exact.numpy(), reference.numpy(), atol=2e-4, rtol=2e-4)


def test_missing_cvxpy_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "clarabel" else real(name)
    )
    with pytest.raises(ImportError, match=r'pip install "jdoptim\[cagrad\]"'):
        CAGrad(0.5, solver="cvxpy")
    CAGrad(0.5)  # the default solver needs nothing
