"""AlignedMTL / AlignedMTLWeighting: values against a torch.linalg reference, properties,
gradients, compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import AlignedMTL, AlignedMTLWeighting
from tests.solvers.bank import KINDS, make_jacobian

from ._linalg_refs import aligned_mtl_ref

EPS64 = torch.finfo(torch.float64).eps
MODES = ("min", "median", "rmse")


pytestmark = pytest.mark.usefixtures("each_eig_method")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 2, 5, 12])
def test_matches_linalg_reference(mode: str, kind: str, m: int) -> None:
    J = make_jacobian(kind, m, seed=m)
    G = J @ J.T
    pref = torch.arange(1.0, m + 1, dtype=torch.float64)
    # What a backward-stable eigensolver guarantees: an error of O(m eps cond) relative to the
    # weights' scale, cond the condition number of G on its kept eigenspace. An entry-wise
    # relative tolerance is not guaranteed for small entries, and fails on some CPUs' BLAS.
    vals = torch.linalg.eigvalsh(G)
    kept = vals[vals > vals.max() * m * EPS64]
    cond = float(kept.max() / kept.min()) if kept.numel() else 1.0
    for p, weighting in (
        (torch.full((m,), 1.0 / m, dtype=torch.float64), AlignedMTLWeighting(scale_mode=mode)),
        (pref, AlignedMTLWeighting(pref, scale_mode=mode)),
    ):
        expected = aligned_mtl_ref(G, p, mode, EPS64)
        atol = 100 * m * EPS64 * cond * float(expected.abs().max())
        torch.testing.assert_close(weighting(G), expected, rtol=0, atol=atol)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_aligned_rows(m: int, n: int, seed: int) -> None:
    """B G B = s P (P the projector on the kept eigenspace): the aligned gradients J^T B have
    equal norms and are orthogonal, and B is symmetric."""
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    G = J @ J.T
    weighting = AlignedMTLWeighting()
    # B column by column: w(e_i) with pref e_i
    B = torch.stack([AlignedMTLWeighting(e)(G) for e in torch.eye(m, dtype=torch.float64)], 1)
    torch.testing.assert_close(B, B.T, rtol=1e-8, atol=1e-10)
    vals = torch.linalg.eigvalsh(G)
    kept = vals > vals.max() * m * EPS64
    s = vals[kept].min()
    BGB = B @ G @ B
    torch.testing.assert_close(BGB @ BGB, s * BGB, rtol=1e-6, atol=1e-8 * float(s))  # s * proj
    torch.testing.assert_close(torch.trace(BGB), s * kept.sum().double(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(weighting(G), B @ torch.full((m,), 1.0 / m, dtype=G.dtype))


def test_zero_gramian_gives_preference() -> None:
    torch.testing.assert_close(AlignedMTLWeighting()(torch.zeros(3, 3)), torch.full((3,), 1 / 3))


def test_median_is_lower_median() -> None:
    G = torch.diag(torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64))
    p = torch.ones(4, dtype=torch.float64)
    # B = sqrt(s) diag(1/sqrt(lambda)); lower median of [1, 4, 9, 16] is 4
    expected = 2.0 / torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(AlignedMTLWeighting(p, scale_mode="median")(G), expected)
    expected_rmse = (7.5**0.5) / torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(AlignedMTLWeighting(p, scale_mode="rmse")(G), expected_rmse)


def test_gradient_matches_linalg_reference() -> None:
    J = make_jacobian("random", 4, seed=5)
    G = (J @ J.T).requires_grad_()
    probe = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    for mode in MODES:
        (grad,) = torch.autograd.grad(AlignedMTLWeighting(scale_mode=mode)(G) @ probe, G)
        p = torch.full((4,), 0.25, dtype=torch.float64)
        (grad_ref,) = torch.autograd.grad(aligned_mtl_ref(G, p, mode, EPS64) @ probe, G)
        grad_ref = (grad_ref + grad_ref.T) / 2
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-9)


def test_aggregator_differentiable_and_repr() -> None:
    J = torch.randn(3, 4, requires_grad=True)
    out = AlignedMTL()(J)
    assert out.requires_grad
    out.sum().backward()
    assert J.grad is not None and bool(torch.isfinite(J.grad).all())
    assert repr(AlignedMTL()) == "AlignedMTL(pref_vector=None, scale_mode='min')"
    assert str(AlignedMTL(torch.tensor([1.0, 2.0]))) == "AlignedMTL([1., 2.])"


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="Invalid scale_mode='bad'"):
        AlignedMTLWeighting(scale_mode="bad")
    with pytest.raises(ValueError, match="Invalid scale_mode"):
        AlignedMTL(scale_mode="bad")
    with pytest.raises(ValueError):
        AlignedMTLWeighting(pref_vector=torch.ones(2, 2))
    with pytest.raises(ValueError):
        AlignedMTLWeighting(pref_vector=torch.ones(3))(torch.eye(2))
    with pytest.raises(ValueError):
        AlignedMTLWeighting()(torch.ones(2, 3))


@pytest.mark.parametrize("mode", MODES)
def test_graph_capture(mode: str) -> None:
    torch._dynamo.reset()
    J = make_jacobian("lowrank", 6).float()
    explanation = torch._dynamo.explain(AlignedMTLWeighting(scale_mode=mode))(J @ J.T)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
