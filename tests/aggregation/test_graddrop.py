"""GradDrop: sign-purity masking with one shared threshold per column, leak, f, compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import GradDrop


def _reference(J: torch.Tensor, u: torch.Tensor, leak=None, f=lambda p: p) -> torch.Tensor:
    m, n = J.shape
    leak = torch.zeros(m, dtype=J.dtype) if leak is None else leak
    out = torch.zeros(n, dtype=J.dtype)
    for j in range(n):
        col = J[:, j]
        p = f(0.5 * (1 + col.sum() / col.abs().sum()))
        for i in range(m):
            keep = bool((p > u[j] and col[i] > 0) or (p < u[j] and col[i] < 0))
            out[j] += (leak[i] + (1 - leak[i]) * float(keep)) * col[i]
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000), m=st.integers(1, 6), n=st.integers(1, 6), with_leak=st.booleans()
)
def test_matches_reference_with_the_same_draws(seed: int, m: int, n: int, with_leak: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    leak = torch.rand(m, generator=g, dtype=torch.float64) if with_leak else None
    torch.manual_seed(seed)
    out = GradDrop(leak=leak)(J)
    after = torch.rand(1)
    torch.manual_seed(seed)
    u = torch.rand(n, dtype=torch.float64)  # exactly one draw of n uniforms per call
    assert torch.equal(after, torch.rand(1))
    torch.testing.assert_close(out, _reference(J, u, leak))


def test_each_column_is_its_positive_or_its_negative_part() -> None:
    J = torch.randn(4, 50, dtype=torch.float64)
    out = GradDrop()(J)
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    assert bool(((out == positive) | (out == negative)).all())
    same_sign = torch.tensor([[1.0, -1.0, 0.0], [2.0, -3.0, 0.0]])
    assert GradDrop()(same_sign).tolist() == [3.0, -4.0, 0.0]


def test_f_and_leak() -> None:
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, -1.0, 1.0]])
    always_positive = GradDrop(f=lambda p: torch.ones_like(p))
    assert always_positive(J).tolist() == [6.0, 1.0, 2.0]
    always_negative = GradDrop(f=lambda p: torch.full_like(p, -1.0))
    assert always_negative(J).tolist() == [-4.0, -1.0, 0.0]
    assert GradDrop(leak=torch.ones(2))(J).tolist() == J.sum(0).tolist()


def test_seeded_reference_value() -> None:
    torch.manual_seed(0)
    out = GradDrop()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    assert out.tolist() == [6.0, 2.0, 2.0]


def test_not_differentiable_and_empty_columns() -> None:
    J = torch.randn(3, 4, requires_grad=True)
    assert not GradDrop()(J).requires_grad
    assert GradDrop()(torch.zeros(2, 0)).shape == (0,)


def test_validation_repr_str() -> None:
    with pytest.raises(ValueError, match="leak must be a 1-dimensional tensor"):
        GradDrop(leak=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"exactly 3 rows \(i.e. the number of leak scalars\)"):
        GradDrop(leak=torch.ones(3))(torch.ones(2, 4))
    with pytest.raises(ValueError):
        GradDrop()(torch.ones(2, 2, 2))
    assert repr(GradDrop()).startswith("GradDrop(f=<function _identity at 0x")
    assert repr(GradDrop()).endswith(", leak=None)")
    assert str(GradDrop()) == "GradDrop"
    assert str(GradDrop(leak=torch.tensor([0.5, 1.0]))) == "GradDrop([0.5, 1.])"


def test_compiles_fullgraph_and_matches_eager_draws() -> None:
    torch._dynamo.reset()
    aggregator = GradDrop(leak=torch.full((5,), 0.1))
    J1, J2 = torch.randn(5, 8), torch.randn(5, 8)
    explanation = torch._dynamo.explain(lambda J: aggregator(J))(J1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda J: aggregator(J), fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        for k, J in enumerate((J1, J2, J1)):
            torch.manual_seed(k)
            eager = aggregator(J)
            torch.manual_seed(k)
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                torch.testing.assert_close(compiled(J), eager)
