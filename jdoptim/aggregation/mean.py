"""Mean: the average of the rows of the Jacobian."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator, Weighting


class MeanWeighting(Weighting):
    r"""Uniform weights :math:`w = \tfrac{1}{m}\mathbb{1}`; reads only the number of rows.

    >>> import torch
    >>> MeanWeighting()(torch.ones(4, 7))
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    input_kind = "matrix"

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)


class Mean(WeightedAggregator):
    r"""Aggregator returning the mean of the rows, :math:`\tfrac{1}{m}\sum_i g_i`.

    >>> import torch
    >>> Mean()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())
