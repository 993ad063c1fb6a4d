"""Weights that a definition bounds respect the bounds exactly, on any CPU.

Simplex weights (MGDA, Mean, Krum, Random, STCH) are exactly non-negative and sum to one up to
the rounding of one normalisation: ``|sum(w) - 1| <= m * eps / 2`` (summed exactly with
``math.fsum``). The inputs are the hard ones: duplicated, opposite and nearly parallel rows,
rank-deficient Gramians and scales from 1e-12 to 1e12.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import (
    KrumWeighting,
    MeanWeighting,
    MGDAWeighting,
    RandomWeighting,
    STCHWeighting,
)
from jdoptim.aggregation.mgda import frank_wolfe_min_norm


def _hard_gramian(seed: int, m: int, n: int, kind: int, scale_exp: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == 1:
        J[1] = J[0]  # duplicated row
    elif kind == 2:
        J[1] = -J[0]  # opposite rows
    elif kind == 3:
        J[1] = J[0] * (1 + 1e-7 * torch.randn((), generator=g, dtype=torch.float64))
    return (J @ J.T) * 10.0**scale_exp


def _assert_on_simplex(w: torch.Tensor) -> None:
    m = w.shape[0]
    assert bool((w >= 0).all()), w
    error = abs(math.fsum(w.double().tolist()) - 1.0)
    assert error <= m * torch.finfo(w.dtype).eps / 2, (w, error)


WEIGHTINGS = {
    "mgda": lambda: MGDAWeighting(),
    "mgda_long": lambda: MGDAWeighting(epsilon=1e-12, max_iters=500),
    "mean": lambda: MeanWeighting(),
    "random": lambda: RandomWeighting(),
    "stch": lambda: STCHWeighting(mu=0.5),
}


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(2, 8),
    n=st.integers(1, 6),
    kind=st.integers(0, 3),
    scale_exp=st.sampled_from([-12, -3, 0, 3, 12]),
)
def test_simplex_weights_are_exactly_on_the_simplex(name, dtype, seed, m, n, kind, scale_exp):
    G = _hard_gramian(seed, m, n, kind, scale_exp).to(dtype)
    _assert_on_simplex(WEIGHTINGS[name]()(G))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(4, 8), kind=st.integers(0, 3))
def test_krum_weights_are_exactly_on_the_simplex(seed: int, m: int, kind: int) -> None:
    G = _hard_gramian(seed, m, 3, kind, 0).float()
    _assert_on_simplex(KrumWeighting(n_byzantine=1, n_selected=2)(G))


def test_frank_wolfe_regression_cases_stay_on_the_simplex() -> None:
    # Opposite rows: before the step was clamped and the result renormalised, the sum of these
    # float64 weights drifted from 1 by 4-5 ulps (more than one normalisation's rounding).
    for seed in range(40):
        G = _hard_gramian(seed, 5, 3, 2, 0)
        _assert_on_simplex(frank_wolfe_min_norm(G, 1e-3, 100))


def test_frank_wolfe_step_is_clamped_to_the_unit_interval() -> None:
    # c just above a with b + a not representable: gamma = (b - a) / (b + c - 2a) can round to
    # more than 1 without the clamp. Whatever the rounding, the weights stay non-negative.
    for exp in range(-30, 30, 3):
        for delta in (1e-16, 1e-15, 1e-12):
            G = torch.tensor([[1.0, 1.0 - delta], [1.0 - delta, 1.0 - delta]], dtype=torch.float64)
            _assert_on_simplex(frank_wolfe_min_norm(G * 2.0**exp, 1e-3, 100))
