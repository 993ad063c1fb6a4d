"""The weights of the normalising weightings do not depend on the Gramian's scale.

Multiplying ``G`` by a power of two (what a gradient scaler does) must leave the weights of
UPGrad, DualProj, CAGrad and IMTL-G *bitwise* unchanged over the whole range of the dtype; other
factors change them by rounding only. torchjd's absolute ``norm_eps=1e-4`` is kept as an
option, and it is what breaks the invariance at small scales.
"""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import (
    CAGradWeighting,
    DualProjWeighting,
    IMTLGWeighting,
    UPGradWeighting,
)
from tests.solvers.bank import make_family

WEIGHTINGS = {
    "upgrad": UPGradWeighting,
    "dualproj": DualProjWeighting,
    "cagrad": lambda: CAGradWeighting(c=0.5),
    "imtlg": IMTLGWeighting,
}


def _gramian(family: str, dtype: torch.dtype) -> torch.Tensor:
    J = make_family(family, 6, 4 if family == "strong" else 8, seed=7)
    return (J @ J.T).to(dtype)


@pytest.mark.parametrize("name", WEIGHTINGS)
@pytest.mark.parametrize("family", ["random", "strong", "opposite"])
@pytest.mark.parametrize(
    "dtype, exponents",
    [(torch.float64, range(-60, 61, 4)), (torch.float32, range(-100, 101, 8))],
    ids=["float64", "float32"],
)
def test_powers_of_two_leave_the_weights_unchanged(name, family, dtype, exponents) -> None:
    weighting = WEIGHTINGS[name]()
    G = _gramian(family, dtype)
    w = weighting(G)
    assert bool(w.abs().sum() > 0)
    for k in exponents:
        scaled = G * 2.0**k
        assert bool(torch.isfinite(scaled).all()) and bool((scaled.diagonal() > 0).all())
        assert torch.equal(weighting(scaled), w), (name, k)


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_other_factors_change_the_weights_by_rounding_only(name) -> None:
    weighting = WEIGHTINGS[name]()
    G = _gramian("random", torch.float64)
    w = weighting(G)
    for factor in (1e-30, 3e-7, 0.7, 1e30):
        torch.testing.assert_close(weighting(G * factor), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [UPGradWeighting, DualProjWeighting])
def test_torchjd_absolute_norm_eps_is_kept_as_an_option(cls) -> None:
    """With ``norm_eps=1e-4`` (torchjd's rule) a Gramian of trace below 1e-4 gives the plain
    preference weights; the default (``None``) only does so for ``G = 0``."""
    G = _gramian("opposite", torch.float64)
    small = G * 2.0**-40
    mean = torch.full((6,), 1 / 6, dtype=torch.float64)
    torch.testing.assert_close(cls(norm_eps=1e-4)(small), mean)
    assert not torch.allclose(cls()(small), mean)
    torch.testing.assert_close(cls()(torch.zeros(6, 6, dtype=torch.float64)), mean)


def test_zero_gramian() -> None:
    zero = torch.zeros(4, 4, dtype=torch.float64)
    assert torch.equal(IMTLGWeighting()(zero), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(CAGradWeighting(c=0.5)(zero), torch.zeros(4, dtype=torch.float64))
