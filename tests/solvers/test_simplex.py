"""Tests of :mod:`jdoptim.solvers.simplex`: exact projection and the linear-plus-norm program."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jdoptim.solvers.simplex import minimize_linear_plus_norm, project_onto_simplex

torch.set_num_threads(1)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


def _quadprog_projection(x: np.ndarray) -> np.ndarray:
    """min 1/2 ||w - x||^2 s.t. 1'w = 1, w >= 0 (quadprog: min 1/2 w'Pw - q'w, C'w >= b)."""
    m = x.shape[0]
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    return quadprog.solve_qp(np.eye(m), x, constraints, bounds, meq=1)[0]


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 12), elements=finite))
def test_projection_matches_quadprog(x: np.ndarray) -> None:
    w = project_onto_simplex(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(w, _quadprog_projection(x), atol=1e-9 * max(1, np.abs(x).max()))
    assert (w >= 0).all()
    assert abs(w.sum() - 1) < 1e-9 * max(1, np.abs(x).max())


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=finite))
def test_projection_is_batched_along_dim(x: np.ndarray) -> None:
    t = torch.from_numpy(x)
    rows = torch.stack([project_onto_simplex(row) for row in t])
    torch.testing.assert_close(project_onto_simplex(t), rows)
    torch.testing.assert_close(project_onto_simplex(t.T, dim=0), rows.T)


def test_projection_fixes_points_of_the_simplex() -> None:
    w = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    torch.testing.assert_close(project_onto_simplex(w), w)
    torch.testing.assert_close(project_onto_simplex(w + 7.0), w)  # shift invariance


def _random_problem(seed: int, m: int, rank: int | None = None):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank or 2 * m + 1, generator=g, dtype=torch.float64)
    G = J @ J.T
    G = G / G.trace()
    a = torch.randn(m, generator=g, dtype=torch.float64) * 0.1
    phi = torch.rand((), generator=g, dtype=torch.float64)
    return G, a, phi


def _objective(G, a, phi, w):
    return w @ a + phi * (w @ G @ w).clamp(min=0).sqrt()


@pytest.mark.parametrize("m", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_plus_norm_satisfies_kkt(m: int, seed: int) -> None:
    G, a, phi = _random_problem(seed, m)
    w = minimize_linear_plus_norm(G, a, phi)
    assert bool((w > 0).all())
    assert abs(float(w.sum()) - 1) < 1e-12
    rho = (w @ G @ w).sqrt()
    grad = a + phi * (G @ w) / rho
    lam = grad.min()
    # Stationarity on the support, dual feasibility off it.
    assert bool(((grad - lam) * w).abs().max() < 1e-10)
    assert bool((grad >= lam - 1e-10).all())


@pytest.mark.parametrize("m", [2, 5, 12])
def test_linear_plus_norm_beats_vertices_and_random_points(m: int) -> None:
    G, a, phi = _random_problem(3, m, rank=max(1, m // 2))  # singular G: non-smooth objective
    w = minimize_linear_plus_norm(G, a, phi)
    best = _objective(G, a, phi, w)
    g = torch.Generator().manual_seed(4)
    others = torch.cat(
        [torch.eye(m, dtype=torch.float64), torch.rand(200, m, generator=g).double()]
    )
    others = others / others.sum(1, keepdim=True)
    values = torch.stack([_objective(G, a, phi, o) for o in others])
    assert bool((best <= values + 1e-12).all())


def test_linear_plus_norm_handles_zero_gramian_and_zero_scale() -> None:
    m = 4
    w = minimize_linear_plus_norm(
        torch.zeros(m, m, dtype=torch.float64),
        torch.zeros(m, dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
    )
    torch.testing.assert_close(w, torch.full((m,), 0.25, dtype=torch.float64))  # analytic centre


def test_linear_plus_norm_matches_clarabel() -> None:
    cp = pytest.importorskip("cvxpy")
    G, a, phi = _random_problem(5, 6)
    w = minimize_linear_plus_norm(G, a, phi)
    factor = np.linalg.cholesky(G.numpy())
    x = cp.Variable(6)
    problem = cp.Problem(
        cp.Minimize(a.numpy() @ x + float(phi) * cp.norm(factor.T @ x)), [x >= 0, cp.sum(x) == 1]
    )
    problem.solve(solver=cp.CLARABEL)
    assert float(_objective(G, a, phi, w)) <= problem.value + 1e-8
    # CLARABEL stops at a 1e-8 gap: its weights are only ~1e-5 accurate here; ours are the better.
    np.testing.assert_allclose(w.numpy(), x.value, atol=1e-4)


def test_linear_plus_norm_compiles_without_graph_breaks() -> None:
    G, a, phi = _random_problem(0, 5)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(minimize_linear_plus_norm)(G, a, phi)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
