"""IMTLG / IMTLGWeighting: values against a torch.linalg reference, properties, compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import IMTLG, IMTLGWeighting
from tests.solvers.bank import KINDS, make_jacobian

from ._linalg_refs import imtlg_ref

EPS64 = torch.finfo(torch.float64).eps


pytestmark = pytest.mark.usefixtures("each_eig_method")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 2, 5, 12])
def test_matches_linalg_reference(kind: str, m: int) -> None:
    J = make_jacobian(kind, m, seed=m)
    G = J @ J.T
    w = IMTLGWeighting()(G)
    expected = imtlg_ref(G, EPS64)
    # The weights are computed from G / tr(G) (exactly scale-invariant), the reference from G:
    # on the worst-conditioned kind (conflict_lowdim, m = 12) Jacobi's rounding then differs
    # by ~1.2e-7 relative.
    torch.testing.assert_close(w, expected, rtol=2e-7, atol=1e-9 * expected.abs().max())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_equal_projections_when_full_rank(m: int, n: int, seed: int) -> None:
    """With J of full row rank, J^T w has the same projection on every unit gradient."""
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = IMTLG()(J)
    proj = (J / J.norm(dim=1, keepdim=True)) @ u
    if m <= n and torch.linalg.matrix_rank(J) == m:
        torch.testing.assert_close(proj, proj.mean().expand(m), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(IMTLGWeighting()(J @ J.T).sum(), torch.tensor(1.0).double())


def test_zero_and_scale_invariance() -> None:
    assert bool((IMTLGWeighting()(torch.zeros(3, 3)) == 0).all())
    J = make_jacobian("random", 4)
    w = IMTLGWeighting()(J @ J.T)
    torch.testing.assert_close(IMTLGWeighting()(1e6 * (J @ J.T)), w)


def test_float32_uses_float32_tolerance() -> None:
    J = make_jacobian("lowrank", 8, seed=3)
    G32 = (J @ J.T).float()
    w = IMTLGWeighting()(G32)
    assert w.dtype == torch.float32
    expected = imtlg_ref(G32, torch.finfo(torch.float32).eps).float()
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)


def test_not_differentiable_and_repr() -> None:
    J = torch.randn(3, 4, requires_grad=True)
    assert not IMTLG()(J).requires_grad
    assert repr(IMTLG()) == "IMTLG()" and str(IMTLG()) == "IMTLG"
    assert repr(IMTLGWeighting()) == "IMTLGWeighting()"


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        IMTLGWeighting()(torch.ones(2, 3))
    with pytest.raises(ValueError):
        IMTLG()(torch.ones(3))
    with pytest.raises(ValueError):
        IMTLG()(torch.tensor([[float("nan"), 1.0]]))


def test_graph_capture() -> None:
    torch._dynamo.reset()
    G = make_jacobian("random", 5).float()
    G = G @ G.T
    explanation = torch._dynamo.explain(IMTLGWeighting())(G)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
