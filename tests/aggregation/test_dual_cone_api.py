"""Behaviour shared by UPGrad and DualProj (aggregators and weightings): validation, bad input,
non-differentiability, float32 output and agreement of the two solvers. (Compile capture is in
test_compile.py; each method's own values are in test_upgrad.py / test_dualproj.py.)"""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import DualProj, DualProjWeighting, UPGrad, UPGradWeighting

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
CLASSES = [UPGrad, UPGradWeighting, DualProj, DualProjWeighting]
PAIRS = [(UPGrad, UPGradWeighting), (DualProj, DualProjWeighting)]


@pytest.mark.parametrize("cls", CLASSES)
def test_validation(cls: type) -> None:
    with pytest.raises(ValueError, match=r"norm_eps must be non-negative, but got -1.0."):
        cls(norm_eps=-1.0)
    with pytest.raises(ValueError, match=r"reg_eps must be non-negative, but got -0.5."):
        cls(reg_eps=-0.5)
    with pytest.raises(ValueError, match="solver"):
        cls(solver="osqp")
    with pytest.raises(ValueError, match="pref_vector"):
        cls(pref_vector=torch.ones(2, 2))


@pytest.mark.parametrize("aggregator, weighting", PAIRS)
def test_pref_vector_length_mismatch_and_bad_input(aggregator: type, weighting: type) -> None:
    with pytest.raises(ValueError, match="rows"):
        aggregator(torch.ones(3))(J_BASE)
    with pytest.raises(ValueError):
        aggregator()(torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        weighting()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="symmetric"):
        weighting()(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        weighting()(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


@pytest.mark.parametrize("aggregator, weighting", PAIRS)
def test_not_differentiable(aggregator: type, weighting: type) -> None:
    J = J_BASE.clone().requires_grad_(True)
    assert not aggregator()(J).requires_grad
    assert not weighting()(J @ J.T).requires_grad


@pytest.mark.parametrize("weighting", [UPGradWeighting, DualProjWeighting])
def test_float32_output_and_solver_agreement(weighting: type) -> None:
    g = torch.Generator().manual_seed(1)
    J = torch.randn(12, 30, generator=g)
    J[:4] = -J[4:8] + 0.1 * J[:4]
    w = weighting()(J @ J.T)
    w_qp = weighting(solver="quadprog")(J @ J.T)
    assert w.dtype == torch.float32
    assert torch.allclose(w, w_qp, rtol=1e-5, atol=1e-6)
