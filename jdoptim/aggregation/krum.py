r"""Krum: keep the gradients closest to their neighbours (Blanchard et al., 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Param, Weighting


def _check_n_byzantine(n_byzantine: int) -> int:
    if n_byzantine < 0:
        raise ValueError(f"n_byzantine must be non-negative, but got {n_byzantine}.")
    return n_byzantine


def _check_n_selected(n_selected: int) -> int:
    if n_selected < 1:
        raise ValueError(f"n_selected must be a positive integer, but got {n_selected}.")
    return n_selected


def pairwise_distances(gramian: Tensor) -> Tensor:
    r"""Euclidean distances :math:`D_{ij} = \sqrt{\max(G_{ii} + G_{jj} - 2 G_{ij}, 0)}` between
    the rows of :math:`J`, read from :math:`G = J J^\top` (the clamp removes rounding
    negatives).

    >>> import torch
    >>> pairwise_distances(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    tensor([[0.0000, 2.2361],
            [2.2361, 0.0000]])
    """
    q = gramian.diagonal()
    squared = q.unsqueeze(1) + q.unsqueeze(0) - 2 * gramian
    return squared.clamp(min=0).sqrt()


class KrumWeighting(Weighting):
    r"""Krum weights: uniform over the ``n_selected`` rows with the smallest Krum scores.

    With :math:`f` = ``n_byzantine`` and :math:`D` the pairwise distances of the rows
    (:func:`pairwise_distances`), the score of row :math:`i` is the sum of its distances to its
    :math:`m - f - 2` nearest other rows (plain distances, not squared). The :math:`k` =
    ``n_selected`` rows with the smallest scores get weight :math:`1/k`, the others 0 (ties are
    broken as :func:`torch.topk` breaks them).

    :param n_byzantine: Number of adversarial rows tolerated (``>= 0``); needs
        ``m >= n_byzantine + 3``.
    :param n_selected: Number of rows averaged (``>= 1``); needs ``m >= n_selected``.

    >>> import torch
    >>> J = torch.tensor([[1.0, 1.0], [1.0, 0.0], [9.0, -9.0], [3.0, 1.0]])
    >>> KrumWeighting(n_byzantine=0)(J @ J.T)
    tensor([1., 0., 0., 0.])
    """

    n_byzantine = Param(_check_n_byzantine)
    n_selected = Param(_check_n_selected)

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Parameter `gramian` should have at least {self.n_byzantine + 3} rows "
                f"(n_byzantine + 3). Found `gramian` with {m} rows."
            )
        if m < self.n_selected:
            raise ValueError(
                f"Parameter `gramian` should have at least {self.n_selected} rows (n_selected). "
                f"Found `gramian` with {m} rows."
            )
        distances = pairwise_distances(stat)
        nearest = torch.topk(distances, k=m - self.n_byzantine - 1, dim=1, largest=False).values
        scores = nearest[:, 1:].sum(dim=1)  # the smallest entry is the zero self-distance
        selected = torch.topk(scores, k=self.n_selected, largest=False).indices
        share = torch.full(
            (self.n_selected,), 1.0 / self.n_selected, dtype=stat.dtype, device=stat.device
        )
        return torch.zeros(m, dtype=stat.dtype, device=stat.device).scatter(0, selected, share)


class Krum(GramianWeightedAggregator):
    r"""Aggregator returning the mean of the ``n_selected`` rows of :math:`J` with the smallest
    Krum scores (see :class:`KrumWeighting`), a Byzantine-robust aggregation.

    :param n_byzantine: Number of adversarial rows tolerated (``>= 0``).
    :param n_selected: Number of rows averaged (``>= 1``).

    >>> import torch
    >>> J = torch.tensor([[1.0, 1.0], [1.0, 0.0], [9.0, -9.0], [3.0, 1.0]])
    >>> Krum(n_byzantine=0, n_selected=2)(J)
    tensor([1.0000, 0.5000])
    """

    n_byzantine = Param(forward="gramian_weighting")
    n_selected = Param(forward="gramian_weighting")

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine=n_byzantine, n_selected=n_selected))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(n_byzantine={self.n_byzantine!r}, "
            f"n_selected={self.n_selected!r})"
        )

    def __str__(self) -> str:
        return f"Krum{self.n_byzantine}-{self.n_selected}"
