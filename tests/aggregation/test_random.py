"""Random / RandomWeighting: simplex weights, seeded draws, gradients, compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import Random, RandomWeighting


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_weights_on_the_open_simplex_from_softmax_of_normals(seed: int, m: int, dtype) -> None:
    torch.manual_seed(seed)
    w = RandomWeighting()(torch.zeros(m, 3, dtype=dtype))
    assert w.dtype == dtype and bool((w > 0).all())
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=dtype))
    torch.manual_seed(seed)
    torch.testing.assert_close(w, torch.softmax(torch.randn(m, dtype=dtype), dim=0))


def test_consumes_m_normal_draws_per_call() -> None:
    torch.manual_seed(7)
    RandomWeighting()(torch.zeros(4, 4))
    after_call = torch.rand(2)
    torch.manual_seed(7)
    torch.randn(4)
    assert torch.equal(after_call, torch.rand(2))


def test_draws_change_between_calls() -> None:
    weighting = RandomWeighting()
    assert not torch.equal(weighting(torch.zeros(5, 1)), weighting(torch.zeros(5, 1)))


def test_seeded_reference_value() -> None:
    torch.manual_seed(0)
    out = Random()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([-2.62288, 1.0, 1.0]))


def test_differentiable_through_the_combination() -> None:
    J = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    Random()(J).sum().backward()
    torch.manual_seed(1)
    w = RandomWeighting()(J.detach())
    torch.testing.assert_close(J.grad, w.unsqueeze(1).expand(3, 5))


def test_repr_and_bad_input() -> None:
    assert repr(Random()) == "Random()" and str(Random()) == "Random"
    with pytest.raises(ValueError):
        Random()(torch.zeros(0, 3))
    with pytest.raises(ValueError):
        RandomWeighting()(torch.ones(3))


def test_compiles_fullgraph_and_matches_eager_draws() -> None:
    torch._dynamo.reset()
    weighting = RandomWeighting()
    G = torch.eye(6)
    explanation = torch._dynamo.explain(lambda G: weighting(G))(G)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        for k in range(3):
            torch.manual_seed(k)
            eager = weighting(G)
            torch.manual_seed(k)
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                torch.testing.assert_close(compiled(2 * G if k else G), eager)
