"""MGDA / MGDAWeighting: Frank–Wolfe semantics, optimality, validation, gradients, compile."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import MGDA, MGDAWeighting

G_BASE = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])


def _reference_frank_wolfe(G: torch.Tensor, epsilon: float, max_iters: int) -> torch.Tensor:
    """The textbook loop with an early ``break`` (float64, Python control flow)."""
    m = G.shape[0]
    alpha = torch.full((m,), 1.0 / m, dtype=torch.float64)
    for _ in range(max_iters):
        t = int(torch.argmin(G @ alpha))
        a, b, c = float(alpha @ G[:, t]), float(alpha @ G @ alpha), float(G[t, t])
        if c <= a:
            gamma = 1.0
        elif b <= a:
            gamma = 0.0
        else:
            gamma = (b - a) / (b + c - 2 * a)
        e_t = torch.zeros(m, dtype=torch.float64)
        e_t[t] = 1.0
        alpha = (1 - gamma) * alpha + gamma * e_t
        if gamma < epsilon:
            break
    return alpha


def _min_norm_value(G: np.ndarray) -> float:
    """min over the simplex of a^T G a, by quadprog (exact active-set QP)."""
    m = G.shape[0]
    P = G + 1e-12 * np.trace(G) * np.eye(m) + 1e-300 * np.eye(m)
    C = np.hstack([np.ones((m, 1)), np.eye(m)])
    b = np.concatenate([[1.0], np.zeros(m)])
    x = quadprog.solve_qp(P, np.zeros(m), C, b, meq=1)[0]
    return float(x @ G @ x)


def _random_jacobian(seed: int, m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    J[0] = -J[-1] + 0.1 * J[0]  # at least one conflict
    return J


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 6), n=st.integers(1, 8))
def test_matches_textbook_loop_with_break(seed: int, m: int, n: int) -> None:
    J = _random_jacobian(seed, m, n)
    G = J @ J.T
    for epsilon, max_iters in ((1e-3, 100), (0.1, 3), (1e-6, 17)):
        w = MGDAWeighting(epsilon=epsilon, max_iters=max_iters)(G)
        torch.testing.assert_close(w, _reference_frank_wolfe(G, epsilon, max_iters))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 5), n=st.integers(1, 6))
def test_converges_to_the_min_norm_point_of_the_hull(seed: int, m: int, n: int) -> None:
    J = _random_jacobian(seed, m, n)
    G = J @ J.T
    w = MGDAWeighting(epsilon=1e-12, max_iters=2000)(G)
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1.0) < 1e-12
    value = float(w @ G @ w)
    optimum = _min_norm_value(G.numpy())
    scale = float(G.diagonal().max())
    assert value >= optimum - 1e-9 * scale  # feasible points cannot beat the optimum
    assert value <= optimum + 2e-3 * scale  # Frank–Wolfe's O(1/k) rate after 2000 steps
    # Frank–Wolfe duality gap w^T G w - min_i (G w)_i bounds the suboptimality.
    gap = value - float((G @ w).min())
    assert gap >= -1e-9 * scale


def test_known_values() -> None:
    torch.testing.assert_close(MGDAWeighting()(G_BASE), torch.tensor([0.6, 0.4]))
    # One step from the uniform point already lands on the optimum of G_base (gamma = 0.2).
    torch.testing.assert_close(MGDAWeighting(max_iters=1)(G_BASE), torch.tensor([0.6, 0.4]))
    assert MGDAWeighting()(torch.tensor([[4.0]])).tolist() == [1.0]
    assert MGDAWeighting()(torch.zeros(2, 2)).tolist() == [1.0, 0.0]
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(MGDA()(J), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))


def test_output_dtype_follows_input() -> None:
    assert MGDAWeighting()(G_BASE).dtype == torch.float32
    assert MGDAWeighting()(G_BASE.double()).dtype == torch.float64


@pytest.mark.parametrize("epsilon", [0.0, -1.0])
def test_bad_epsilon(epsilon: float) -> None:
    with pytest.raises(ValueError, match="epsilon must be positive"):
        MGDA(epsilon=epsilon)
    weighting = MGDAWeighting()
    with pytest.raises(ValueError, match="epsilon must be positive"):
        weighting.epsilon = epsilon


@pytest.mark.parametrize("max_iters", [0, -3, 2.5])
def test_bad_max_iters(max_iters) -> None:
    with pytest.raises(ValueError, match="max_iters must be a positive integer"):
        MGDAWeighting(max_iters=max_iters)
    aggregator = MGDA()
    with pytest.raises(ValueError, match="max_iters must be a positive integer"):
        aggregator.max_iters = max_iters


def test_setters_and_repr() -> None:
    aggregator = MGDA()
    aggregator.epsilon, aggregator.max_iters = 0.1, 3
    assert aggregator.gramian_weighting.epsilon == 0.1
    assert repr(aggregator) == "MGDA(epsilon=0.1, max_iters=3)"
    assert str(aggregator) == "MGDA"


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        MGDAWeighting()(torch.ones(2, 3))
    with pytest.raises(ValueError):
        MGDA()(torch.ones(3))


def _loss(J: torch.Tensor) -> torch.Tensor:
    return (MGDA(epsilon=1e-9)(J) * torch.arange(J.shape[1], dtype=J.dtype)).sum()


def test_differentiable_matches_finite_differences() -> None:
    J = _random_jacobian(3, 4, 5).requires_grad_()
    (grad,) = torch.autograd.grad(_loss(J), J)
    h, numeric = 1e-6, torch.zeros_like(J)
    with torch.no_grad():
        for i in range(J.shape[0]):
            for j in range(J.shape[1]):
                e = torch.zeros_like(J)
                e[i, j] = h
                numeric[i, j] = (_loss(J + e) - _loss(J - e)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-6)


def test_compiled_gradient_equals_eager() -> None:
    # Regression test: torch 2.13's compiled while_loop backward drops gradients unless the
    # carry starts attached to G and the diagonal is read inside the body.
    torch._dynamo.reset()
    J = _random_jacobian(5, 5, 6).requires_grad_()
    (eager,) = torch.autograd.grad(_loss(J), J)
    (compiled,) = torch.autograd.grad(torch.compile(_loss, fullgraph=True)(J), J)
    torch.testing.assert_close(compiled, eager)


def test_compiles_fullgraph_without_recompiling() -> None:
    torch._dynamo.reset()
    weighting = MGDAWeighting()
    G1, G2 = (J @ J.T for J in (_random_jacobian(0, 6, 9), _random_jacobian(1, 6, 9)))
    G1, G2 = G1.float(), G2.float()
    explanation = torch._dynamo.explain(lambda G: weighting(G))(G1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    torch.testing.assert_close(compiled(G1), weighting(G1), rtol=1e-6, atol=1e-7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(G2), weighting(G2), rtol=1e-6, atol=1e-7)


def test_accelerator_path_runs_all_iterations_with_the_same_result(monkeypatch) -> None:
    # Off the CPU the loop never reads the flag (fixed_loop); the frozen iterations change nothing.
    import jdoptim.aggregation.mgda as mgda_module
    from jdoptim.solvers._loop import fixed_loop

    monkeypatch.setattr(
        mgda_module, "bounded_loop", lambda n, body, init, done_index: fixed_loop(n, body, init)
    )
    torch._dynamo.reset()
    J = _random_jacobian(8, 5, 6).requires_grad_()
    G = (J @ J.T).detach()
    torch.testing.assert_close(MGDAWeighting()(G), _reference_frank_wolfe(G, 1e-3, 100))
    (eager,) = torch.autograd.grad(_loss(J), J)
    (compiled,) = torch.autograd.grad(torch.compile(_loss, fullgraph=True)(J), J)
    torch.testing.assert_close(compiled, eager)
