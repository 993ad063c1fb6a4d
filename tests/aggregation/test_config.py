"""ConFIG: values against a torch.linalg reference, properties, compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import ConFIG
from tests.solvers.bank import KINDS, make_jacobian

from ._linalg_refs import config_ref

EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("each_eig_method")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 2, 5, 12])
def test_matches_linalg_reference_float32(kind: str, m: int) -> None:
    """float32 input: the pinv tolerance is max(m, n) * eps(float32) on the singular values."""
    J = make_jacobian(kind, m, seed=m).float()
    out = ConFIG()(J)
    assert out.dtype == torch.float32
    expected = config_ref(J, torch.ones(m), rtol=max(J.shape) * EPS32)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(J.norm()))


@pytest.mark.parametrize("kind", ["random", "lowrank", "rank2"])
def test_matches_linalg_reference_float64(kind: str) -> None:
    """float64, exactly rank-deficient: the Gram route drops the null directions as pinv does."""
    J = make_jacobian(kind, 7, seed=2)
    pref = torch.arange(1.0, 8.0, dtype=torch.float64)
    expected = config_ref(J, pref, rtol=max(J.shape) * torch.finfo(torch.float64).eps)
    torch.testing.assert_close(ConFIG(pref)(J), expected, rtol=1e-9, atol=1e-9 * expected.norm())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_conflict_free_when_full_rank(m: int, n: int, seed: int) -> None:
    """With J of full row rank, the direction has equal positive cosine with every gradient."""
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = ConFIG()(J)
    if m <= n and torch.linalg.svdvals(J).min() > 1e-3 * torch.linalg.svdvals(J).max():
        cos = (J / J.norm(dim=1, keepdim=True)) @ (out / out.norm())
        torch.testing.assert_close(cos, cos.mean().expand(m), rtol=1e-6, atol=1e-9)
        assert bool((cos > 0).all())
        torch.testing.assert_close(out.norm(), (J @ out).sum() / out.norm(), rtol=1e-9, atol=0)


def test_zero_rows_and_matrix() -> None:
    assert bool((ConFIG()(torch.zeros(2, 3)) == 0).all())
    J = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(ConFIG()(J), J[0])


def test_not_differentiable_repr_and_errors() -> None:
    J = torch.randn(3, 4, requires_grad=True)
    assert not ConFIG()(J).requires_grad
    assert repr(ConFIG()) == "ConFIG(pref_vector=None)" and str(ConFIG()) == "ConFIG"
    assert str(ConFIG(torch.tensor([1.0, 2.0]))) == "ConFIG([1., 2.])"
    with pytest.raises(ValueError):
        ConFIG(torch.ones(2, 2))
    with pytest.raises(ValueError):
        ConFIG(torch.ones(3))(torch.ones(2, 4))
    with pytest.raises(ValueError):
        ConFIG()(torch.ones(2, 2, 2))


def test_compiles_fullgraph_and_matches_eager() -> None:
    torch._dynamo.reset()
    aggregator = ConFIG()
    J1, J2 = make_jacobian("random", 5, seed=1).float(), make_jacobian("lowrank", 5).float()
    explanation = torch._dynamo.explain(aggregator)(J1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(aggregator, fullgraph=True)
    for J in (J1, J2):
        with torch._dynamo.config.patch(error_on_recompile=J is J2):
            out = compiled(J)
        torch.testing.assert_close(out, aggregator(J), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
