"""STCH / STCHWeighting: weights formula, warm-up state machine, state_dict, reset, compile."""

from __future__ import annotations

import io

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import STCH, Stateful, STCHWeighting

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
SEQUENCE = [J_BASE, 2 * J_BASE, J_BASE * torch.tensor([[1.0], [3.0]]), J_BASE]
EXPECTED_WEIGHTS = [[0.5, 0.5], [0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(1, 6),
    mu=st.sampled_from([0.25, 0.5, 1.0, 2.0, 7.0]),
)
def test_weights_are_powers_of_the_norms(seed: int, m: int, mu: float) -> None:
    J = torch.randn(m, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = STCHWeighting(mu=mu)(J @ J.T)
    powers = J.norm(dim=1) ** (1 / mu)
    torch.testing.assert_close(w, powers / powers.sum())
    # Larger norms never get smaller weights.
    order = J.norm(dim=1).argsort()
    assert bool((w[order].diff() >= -1e-12).all())


def test_mu_controls_concentration() -> None:
    G = torch.diag(torch.tensor([1.0, 4.0, 9.0]))
    assert float(STCHWeighting(mu=0.05)(G)[2]) > 0.99
    torch.testing.assert_close(STCHWeighting(mu=1e4)(G), torch.full((3,), 1 / 3), atol=1e-3, rtol=0)


def test_zero_gradients_give_uniform_weights() -> None:
    torch.testing.assert_close(STCHWeighting()(torch.zeros(3, 3)), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warmup_sequence(dtype: torch.dtype) -> None:
    aggregator = STCH(warmup_steps=2)
    seen = []
    aggregator.weighting.register_forward_hook(lambda _m, _i, out: seen.append(out))
    for Jk, expected in zip(SEQUENCE, EXPECTED_WEIGHTS, strict=True):
        Jk = Jk.to(dtype)
        out = aggregator(Jk)
        torch.testing.assert_close(seen[-1], torch.tensor(expected, dtype=dtype))
        torch.testing.assert_close(out, seen[-1] @ Jk)
    state = aggregator.gramian_weighting
    assert int(state.step) == 4 and bool(state.has_nadir)
    torch.testing.assert_close(state.nadir_vector, 1.5 * J_BASE.to(dtype).norm(dim=1))


def test_without_warmup_the_step_never_moves() -> None:
    weighting = STCHWeighting()
    for _ in range(3):
        weighting(J_BASE @ J_BASE.T)
    assert int(weighting.step) == 0 and weighting.nadir_vector.numel() == 0


def _roundtrip(module: torch.nn.Module) -> dict:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3])
def test_state_dict_round_trip_into_a_fresh_instance(stop_after: int) -> None:
    reference = STCHWeighting(warmup_steps=2)
    expected = [reference(Jk @ Jk.T) for Jk in SEQUENCE]

    first = STCHWeighting(warmup_steps=2)
    outputs = [first(Jk @ Jk.T) for Jk in SEQUENCE[:stop_after]]
    second = STCHWeighting(warmup_steps=2)
    second.load_state_dict(_roundtrip(first))
    outputs += [second(Jk @ Jk.T) for Jk in SEQUENCE[stop_after:]]
    for out, exp in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, exp)


def test_aggregator_state_dict_and_reset() -> None:
    first = STCH(warmup_steps=2)
    first(SEQUENCE[0])
    first(SEQUENCE[1])
    second = STCH(warmup_steps=2)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second(SEQUENCE[2]), first(SEQUENCE[2]))
    assert isinstance(second, Stateful)
    second.reset()
    weighting = second.gramian_weighting
    assert int(weighting.step) == 0 and not bool(weighting.has_nadir)
    # After reset the warm-up starts again, and the number of objectives may change.
    J3 = torch.randn(3, 4)
    torch.testing.assert_close(weighting(J3 @ J3.T), torch.full((3,), 1 / 3))


def test_changing_m_during_warmup_raises() -> None:
    weighting = STCHWeighting(warmup_steps=3)
    weighting(J_BASE @ J_BASE.T)
    with pytest.raises(ValueError, match="reset"):
        weighting(torch.eye(3))


def test_differentiable() -> None:
    J = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda J: STCH(mu=0.7)(J), (J,))
    G = (J @ J.T).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda G: STCHWeighting(mu=0.7)(G), (G,))
    # After the warm-up the nadir is fixed (detached), so the weights are smooth in G again.
    weighting = STCHWeighting(warmup_steps=1)
    weighting(2 * G.detach())
    assert torch.autograd.gradcheck(lambda G: weighting(G), (G,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mu": 0.0}, r"Parameter `mu` should be a positive float. Found `mu = 0.0`."),
        ({"mu": -1}, r"Found `mu = -1`"),
        ({"warmup_steps": 0}, r"positive integer or None. Found `warmup_steps = 0`."),
    ],
)
def test_bad_parameters(kwargs: dict, message: str) -> None:
    for cls in (STCH, STCHWeighting):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


def test_repr_and_str() -> None:
    assert repr(STCH()) == "STCH(mu=1.0, warmup_steps=None, eps=1e-20)"
    assert str(STCH()) == "STCH(mu=1)"
    assert str(STCH(mu=0.5)) == "STCH(mu=0.5)"
    assert str(STCH(mu=10.0)) == "STCH(mu=10)"
    assert str(STCH(mu=10)) == "STCH(mu=10)"
    assert repr(STCHWeighting(mu=0.5)) == "STCHWeighting()"


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        STCH()(torch.zeros(0, 3))
    with pytest.raises(ValueError):
        STCHWeighting()(torch.ones(2, 3))


def test_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    weighting = STCHWeighting(mu=0.5)
    G1, G2 = (J @ J.T for J in (torch.randn(5, 7), torch.randn(5, 7)))
    explanation = torch._dynamo.explain(lambda G: weighting(G))(G1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    torch.testing.assert_close(compiled(G1), weighting(G1))
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(G2), weighting(G2))


def test_compiled_warmup_does_not_recompile_as_the_step_advances() -> None:
    torch._dynamo.reset()
    eager, stateful = STCHWeighting(warmup_steps=2), STCHWeighting(warmup_steps=2)
    compiled = torch.compile(lambda G: stateful(G), fullgraph=True)
    Gs = [Jk @ Jk.T for Jk in SEQUENCE]
    # The vector buffers are sized by the first call: one compilation before, one after.
    torch.testing.assert_close(compiled(Gs[0]), eager(Gs[0]))
    torch.testing.assert_close(compiled(Gs[1]), eager(Gs[1]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for G in Gs[2:] + Gs:
            torch.testing.assert_close(compiled(G), eager(G))
    assert int(stateful.step) == int(eager.step) == 8
