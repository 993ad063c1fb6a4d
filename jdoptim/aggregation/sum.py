"""Sum: the sum of the rows of the Jacobian."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator, Weighting


class SumWeighting(Weighting):
    r"""Unit weights :math:`w = \mathbb{1}`; reads only the number of rows.

    >>> import torch
    >>> SumWeighting()(torch.zeros(3, 3))
    tensor([1., 1., 1.])
    """

    input_kind = "matrix"

    def forward(self, stat: Tensor, /) -> Tensor:
        return torch.ones(stat.shape[0], dtype=stat.dtype, device=stat.device)


class Sum(WeightedAggregator):
    r"""Aggregator returning the sum of the rows, :math:`\sum_i g_i`.

    >>> import torch
    >>> Sum()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([2., 2., 2.])
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())
