"""DualProj / DualProjWeighting: values, API and compile capture (the quadprog reference records
of both classes run in test_upgrad.py)."""

from __future__ import annotations

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
        == "DualProj(pref_vector=None, norm_eps=None, reg_eps=0.0001, solver='torch')"
    )
    assert str(DualProj()) == "DualProj"
    assert str(DualProj(torch.tensor([0.5, 0.25]))) == "DualProj([0.5, 0.25])"
    assert repr(DualProj(solver="quadprog")).endswith("solver='quadprog')")
    assert repr(DualProjWeighting()) == "DualProjWeighting(\n  (weighting): MeanWeighting()\n)"
