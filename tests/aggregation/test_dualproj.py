"""DualProj / DualProjWeighting: values, API and compile capture (the quadprog reference records
of both classes run in test_upgrad.py)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from jdoptim.aggregation import DualProj, DualProjWeighting, Flattening

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def test_docstring_values() -> None:
    assert torch.allclose(DualProj()(J_BASE), torch.tensor([0.5563, 1.1109, 1.1109]), atol=1e-4)
    assert torch.allclose(
        DualProjWeighting()(J_BASE @ J_BASE.T), torch.tensor([0.6109, 0.5000]), atol=1e-4
    )
    out = Flattening(DualProjWeighting())(torch.ones((2, 3, 3, 2)))
    assert torch.allclose(out, torch.full((2, 3), 1 / 6))


def test_non_conflicting_and_weights_sum_rows() -> None:
    g = torch.Generator().manual_seed(0)
    J = torch.randn(10, 20, generator=g, dtype=torch.float64)
    J[:3] *= -1
    d = DualProj()(J)
    G = J @ J.T
    w = DualProjWeighting()(G)
    assert torch.allclose(d, w @ J)
    tau = G.diagonal().sum()
    assert bool((J @ d >= -(tau * 1e-4 * w.clamp(min=0) + 1e-9)).all())
    # The weights are feasible (w >= p) and optimal: lambda = G_hat w >= 0, zero where w > p.
    G_hat = G / tau + 1e-4 * torch.eye(10, dtype=G.dtype)
    lam = G_hat @ w
    assert bool((w >= 0.1 - 1e-12).all()) and bool((lam >= -1e-12).all())
    assert bool(((lam * (w - 0.1)).abs() <= 1e-12).all())


def test_repr_str_and_module_tree() -> None:
    assert (
        repr(DualProj())
        == "DualProj(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001, solver='torch')"
    )
    assert str(DualProj()) == "DualProj"
    assert str(DualProj(torch.tensor([0.5, 0.25]))) == "DualProj([0.5, 0.25])"
    assert repr(DualProj(solver="quadprog")).endswith("solver='quadprog')")
    assert repr(DualProjWeighting()) == "DualProjWeighting(\n  (weighting): MeanWeighting()\n)"


@pytest.mark.parametrize("cls", [DualProj, DualProjWeighting])
def test_validation(cls: type) -> None:
    with pytest.raises(ValueError, match=r"norm_eps must be non-negative, but got -1.0."):
        cls(norm_eps=-1.0)
    with pytest.raises(ValueError, match=r"reg_eps must be non-negative, but got -0.5."):
        cls(reg_eps=-0.5)
    with pytest.raises(ValueError, match="solver"):
        cls(solver="osqp")
    with pytest.raises(ValueError, match="pref_vector"):
        cls(pref_vector=torch.ones(2, 2))


def test_pref_vector_length_mismatch_and_bad_input() -> None:
    with pytest.raises(ValueError, match="rows"):
        DualProj(torch.ones(3))(J_BASE)
    with pytest.raises(ValueError):
        DualProj()(torch.ones(3))
    with pytest.raises(ValueError):
        DualProjWeighting()(torch.ones(2, 3))


def test_not_differentiable() -> None:
    J = J_BASE.clone().requires_grad_(True)
    assert not DualProj()(J).requires_grad
    assert not DualProjWeighting()(J @ J.T).requires_grad


def test_float32_output_and_solver_agreement() -> None:
    g = torch.Generator().manual_seed(1)
    J = torch.randn(12, 30, generator=g)
    J[:4] = -J[4:8] + 0.1 * J[:4]
    w = DualProjWeighting()(J @ J.T)
    w_qp = DualProjWeighting(solver="quadprog")(J @ J.T)
    assert w.dtype == torch.float32
    assert torch.allclose(w, w_qp, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    weighting = DualProjWeighting()
    g = torch.Generator().manual_seed(2)
    J1, J2 = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g)
    J1[0] = -J1[1] + 0.1 * J1[0]
    explanation = torch._dynamo.explain(lambda G: weighting(G))(J1 @ J1.T)
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    assert torch.allclose(compiled(J1 @ J1.T), weighting(J1 @ J1.T), rtol=1e-6, atol=1e-7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.allclose(compiled(J2 @ J2.T), weighting(J2 @ J2.T), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
