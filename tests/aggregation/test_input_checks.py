"""The value checks of the weightings' inputs: non-finite entries are refused, finite ones are
not, even when their sum overflows (the check's one-reduction fast path falls back then)."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import MeanWeighting, UPGradWeighting


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_entries_are_refused(bad: float, dtype: torch.dtype) -> None:
    for i, j, both in [(0, 0, True), (1, 1, True), (2, 2, True), (0, 2, True), (2, 1, False)]:
        G = torch.eye(3, dtype=dtype)  # wherever the entry is, in a symmetric pair or not
        G[i, j] = bad
        if both:
            G[j, i] = bad
        with pytest.raises(ValueError, match="non-finite"):
            UPGradWeighting()(G)
        with pytest.raises(ValueError, match="non-finite"):
            MeanWeighting()(G)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_entries_whose_sum_overflows_pass(dtype: torch.dtype) -> None:
    huge = torch.finfo(dtype).max / 2
    J = torch.full((4, 3), huge, dtype=dtype)
    assert not bool(torch.isfinite(J.sum()))  # the fast path cannot decide alone
    torch.testing.assert_close(MeanWeighting()(J), torch.full((4,), 0.25, dtype=dtype))
    G = torch.full((3, 3), huge, dtype=dtype)  # symmetric and finite, its sum overflows
    assert bool(torch.isfinite(UPGradWeighting()(G)).all())
