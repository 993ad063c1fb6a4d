r"""Random: a random convex combination of the rows (Lin et al., 2021, "Random loss weighting")."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator, Weighting


class RandomWeighting(Weighting):
    r"""Random weights on the open simplex, drawn anew at every call:

    .. math::
        w = \operatorname{softmax}(z), \qquad z \sim \mathcal{N}(0, I_m),

    with ``z = torch.randn(m)`` drawn from the global generator in the input's dtype and device
    (so the weights follow a logistic-normal law: every :math:`w_i > 0` and
    :math:`\sum_i w_i = 1`). It only reads the number of rows of its input.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> RandomWeighting()(torch.zeros(2, 2))
    tensor([0.8623, 0.1377])
    """

    input_kind = "matrix"

    def forward(self, stat: Tensor, /) -> Tensor:
        z = torch.randn(stat.shape[0], dtype=stat.dtype, device=stat.device)
        return torch.softmax(z, dim=0)


class Random(WeightedAggregator):
    r"""Aggregator :math:`J \mapsto w^\top J` with random weights :math:`w` from
    :class:`RandomWeighting`. Differentiable in :math:`J` (the weights are constants).

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> Random()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([-2.6229,  1.0000,  1.0000])
    """

    def __init__(self) -> None:
        super().__init__(RandomWeighting())
