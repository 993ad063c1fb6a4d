r"""TrimmedMean: the coordinate-wise trimmed mean of the rows (Yin et al., 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregator, Param


def _check_trim_number(trim_number: int) -> int:
    if trim_number < 0:
        raise ValueError(f"trim_number must be non-negative, but got {trim_number}.")
    return trim_number


class TrimmedMean(Aggregator):
    r"""Coordinate-wise trimmed mean of the rows of :math:`J`.

    For every column :math:`j`, sort :math:`J_{1j}, \dots, J_{mj}` increasingly into
    :math:`J_{(1)j} \le \dots \le J_{(m)j}`, drop the :math:`t` smallest and :math:`t` largest
    values and average the rest:

    .. math::
        d_j = \frac{1}{m - 2t} \sum_{k=t+1}^{m-t} J_{(k)j}.

    :param trim_number: The number :math:`t \ge 0` of values dropped at each end of every
        column; the input needs at least :math:`2t + 1` rows.

    >>> import torch
    >>> TrimmedMean(trim_number=1)(torch.tensor([[1.0, -9.0], [2.0, 5.0], [100.0, 4.0]]))
    tensor([2., 4.])
    """

    trim_number = Param(_check_trim_number)

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        self.trim_number = trim_number

    def forward(self, matrix: Tensor, /) -> Tensor:
        m, t = matrix.shape[0], self.trim_number
        if m < 2 * t + 1:
            raise ValueError(
                f"Parameter `matrix` should be a matrix of at least {2 * t + 1} rows (i.e. "
                f"`2 * trim_number + 1`). Found `matrix` of shape `{matrix.shape}`."
            )
        sorted_matrix = torch.sort(matrix, dim=0).values
        return sorted_matrix.narrow(0, t, m - 2 * t).mean(dim=0)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(trim_number={self.trim_number!r})"

    def __str__(self) -> str:
        return f"TM{self.trim_number}"
