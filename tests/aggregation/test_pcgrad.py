"""PCGrad / PCGradWeighting: closed form for m = 2, sequential reference, RNG use, compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import PCGrad, PCGradWeighting
from jdoptim.aggregation.pcgrad import pcgrad_coefficients, random_visit_orders


def _jacobian(seed: int, m: int, n: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=dtype)
    J[0] = -J[-1] + 0.2 * J[0]  # make conflicts likely
    return J


def _reference_pcgrad(J: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Projects the actual gradient vectors one after the other (the paper's loop)."""
    total = torch.zeros(J.shape[1], dtype=J.dtype)
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            inner = g @ J[j]
            if inner < 0:
                g = g - inner / (J[j] @ J[j]) * J[j]
        total += g
    return total


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7))
def test_two_objectives_closed_form(seed: int, n: int) -> None:
    J = _jacobian(seed, 2, n)
    g1, g2 = J[0], J[1]
    ip = g1 @ g2
    if ip < 0:
        expected = g1 - ip / (g2 @ g2) * g2 + g2 - ip / (g1 @ g1) * g1
    else:
        expected = g1 + g2
    torch.testing.assert_close(PCGrad()(J), expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 7), n=st.integers(1, 6))
def test_matches_sequential_projection_of_vectors(seed: int, m: int, n: int) -> None:
    J = _jacobian(seed, m, n)
    torch.manual_seed(seed)
    orders = random_visit_orders(m, torch.device("cpu"))
    C = pcgrad_coefficients(J @ J.T, orders)
    torch.testing.assert_close(C.sum(0) @ J, _reference_pcgrad(J, orders))
    # Each projected row no longer conflicts with the last gradient it was projected on.
    projected = C @ J
    assert bool(torch.isfinite(projected).all())


def test_seeded_call_uses_m_randperm_draws() -> None:
    m = 5
    J = _jacobian(0, m, 4)
    torch.manual_seed(123)
    out = PCGrad()(J)
    after_call = torch.rand(3)
    torch.manual_seed(123)
    orders = torch.stack([torch.randperm(m) for _ in range(m)])
    after_draws = torch.rand(3)
    assert torch.equal(after_call, after_draws)  # same consumption of the CPU generator
    torch.testing.assert_close(out, _reference_pcgrad(J, orders))


def test_known_values() -> None:
    G = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
    torch.testing.assert_close(PCGradWeighting()(G), torch.tensor([20 / 9, 30 / 19]))
    assert PCGradWeighting()(torch.zeros(3, 3)).tolist() == [1.0, 1.0, 1.0]
    # No conflict: plain sum.
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    torch.testing.assert_close(PCGrad()(J), J.sum(0))


def test_visit_orders_are_permutations() -> None:
    orders = random_visit_orders(6, torch.device("cpu"))
    assert orders.shape == (6, 6) and orders.dtype == torch.int64
    assert bool((orders.sort(dim=1).values == torch.arange(6)).all())
    # The device path (argsort of uniform draws) keeps the shape and dtype.
    meta = random_visit_orders(6, torch.device("meta"))
    assert meta.shape == (6, 6) and meta.dtype == torch.int64


def test_not_differentiable() -> None:
    J = _jacobian(1, 3, 4).requires_grad_()
    assert not PCGrad()(J).requires_grad
    assert not PCGradWeighting()(J @ J.T).requires_grad


def test_float32_and_repr() -> None:
    J = _jacobian(2, 4, 3, dtype=torch.float32)
    assert PCGrad()(J).dtype == torch.float32
    assert repr(PCGrad()) == "PCGrad()" and str(PCGrad()) == "PCGrad"


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        PCGradWeighting()(torch.ones(2, 3))
    with pytest.raises(ValueError):
        PCGrad()(torch.zeros(0, 3))


def test_compiles_fullgraph_and_matches_eager_draws() -> None:
    torch._dynamo.reset()
    weighting = PCGradWeighting()
    G1, G2 = (
        J @ J.T for J in (_jacobian(0, 6, 9, torch.float32), _jacobian(1, 6, 9, torch.float32))
    )
    explanation = torch._dynamo.explain(lambda G: weighting(G))(G1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        for k, G in enumerate((G1, G2, G1)):
            torch.manual_seed(k)
            eager = weighting(G)
            torch.manual_seed(k)
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                out = compiled(G)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
