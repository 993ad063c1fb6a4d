"""torchjd >= 0.11's ``projector=`` form of UPGrad and DualProj (and their weightings)."""

from __future__ import annotations

import pytest
import torch

import jdoptim.aggregation as agg
from jdoptim.linalg import DualConeProjector, QuadprogProjector, TorchProjector
from jdoptim.solvers._eager_compile import eager_compilation_enabled, set_eager_compilation

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [1.0, -3.0, 2.0]], dtype=torch.float64)
CLASSES = [agg.UPGrad, agg.DualProj]


@pytest.fixture(autouse=True, scope="module")
def _eager_solvers():
    # The plumbing, not the solver's compiled kernel, is under test here.
    previous = eager_compilation_enabled()
    set_eager_compilation(False)
    yield
    set_eager_compilation(previous)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("projector", "solver"), [(QuadprogProjector, "quadprog"), (TorchProjector, "torch")]
)
def test_projector_means_the_same_as_the_flat_parameters(cls, projector, solver) -> None:
    expected = cls(norm_eps=0.5, reg_eps=0.01, solver=solver)(J)
    torch.testing.assert_close(cls(projector=projector(norm_eps=0.5, reg_eps=0.01))(J), expected)
    # torchjd 0.18's positional form: (pref_vector, projector)
    torch.testing.assert_close(cls(None, projector(norm_eps=0.5, reg_eps=0.01))(J), expected)
    weighting = cls.weighting_class(projector=projector(norm_eps=0.5, reg_eps=0.01))
    torch.testing.assert_close(weighting(J @ J.T) @ J, expected)


def test_projector_settings_take_effect_and_are_validated() -> None:
    upgrad = agg.UPGrad(projector=QuadprogProjector())
    upgrad.projector.reg_eps = 0.5
    torch.testing.assert_close(upgrad(J), agg.UPGrad(reg_eps=0.5, solver="quadprog")(J))
    with pytest.raises(ValueError, match="norm_eps must be non-negative"):
        QuadprogProjector(norm_eps=-1.0)
    with pytest.raises(TypeError):
        QuadprogProjector(0.1)  # keyword-only, as torchjd
    assert repr(QuadprogProjector()) == "QuadprogProjector(norm_eps=0.0001, reg_eps=0.0001)"


def test_a_custom_projector_is_called() -> None:
    calls = []

    class Clamp(DualConeProjector):
        def __call__(self, lower: torch.Tensor, gramian: torch.Tensor, /) -> torch.Tensor:
            calls.append(lower.shape)
            return lower.clamp(min=0)

    out = agg.DualProj(projector=Clamp())(J)
    torch.testing.assert_close(out, J.mean(0))  # the lower bound itself: the mean
    assert calls == [torch.Size([3])]
