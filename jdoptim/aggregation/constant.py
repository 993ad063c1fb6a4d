"""Constant: user-given weights."""

from __future__ import annotations

from torch import Tensor

from ._base import Param, WeightedAggregator, Weighting
from ._format import vector_to_str


def _check_weights_vector(weights: Tensor) -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() != 1:
        shape = weights.shape if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"Parameter `weights` should be a 1-dimensional tensor. Found `weights.shape = "
            f"{shape}`."
        )
    return weights


class ConstantWeighting(Weighting):
    r"""Fixed weights :math:`w = c` given at construction; checks that ``len(c) == m``.

    The weights are cast to the input's dtype and device at call time.

    >>> import torch
    >>> ConstantWeighting(torch.tensor([1.0, 2.0]))(torch.ones(2, 2))
    tensor([1., 2.])
    """

    input_kind = "matrix"
    weights = Param(_check_weights_vector, buffer=True)

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, stat: Tensor, /) -> Tensor:
        if stat.shape[0] != self.weights.shape[0]:
            raise ValueError(
                f"Parameter `matrix` should have {self.weights.shape[0]} rows (the number of "
                f"specified weights). Found `matrix` with {stat.shape[0]} rows."
            )
        return self.weights.to(dtype=stat.dtype, device=stat.device)


class Constant(WeightedAggregator):
    r"""Aggregator :math:`J \mapsto c^\top J` for fixed weights :math:`c`.

    >>> import torch
    >>> Constant(torch.tensor([1.0, 2.0]))(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([8., 3., 3.])
    """

    weights = Param(forward="weighting")

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weights={self.weights!r})"

    def __str__(self) -> str:
        return f"{self.__class__.__name__}({vector_to_str(self.weights)})"
