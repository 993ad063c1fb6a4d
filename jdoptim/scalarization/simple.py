r"""Fixed scalarizations: :class:`Sum`, :class:`Mean`, :class:`Constant`, :class:`Random`,
:class:`GeometricMean`."""

from __future__ import annotations

import torch
from torch import Tensor

from .._params import Param
from ..aggregation._checks import should_check_values
from ..aggregation._format import vector_to_str
from ._base import Scalarizer, check_shape_matches, shape_str


class Sum(Scalarizer):
    r""":math:`\sum_i L_i`.

    >>> import torch
    >>> Sum()(torch.tensor([0.5, 1.5, 2.0]))
    tensor(4.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        return values.sum()


class Mean(Scalarizer):
    r""":math:`\frac1k \sum_i L_i` over the :math:`k` entries.

    >>> import torch
    >>> Mean()(torch.tensor([0.5, 1.5, 2.0]))
    tensor(1.3333)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        return values.mean()


def _check_weights(weights: Tensor) -> Tensor:
    if not isinstance(weights, Tensor):
        raise TypeError("Parameter `weights` should be a Tensor.")
    return weights


class Constant(Scalarizer):
    r""":math:`\sum_i c_i L_i` for fixed weights :math:`c` of the shape of the losses (not
    cast: mixed dtypes promote).

    >>> import torch
    >>> Constant(torch.tensor([1.0, 2.0, 3.0]))(torch.tensor([0.5, 1.5, 2.0]))
    tensor(9.5000)
    """

    weights = Param(_check_weights, buffer=True)

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, values: Tensor, /) -> Tensor:
        check_shape_matches(values, tuple(self.weights.shape), "weights")
        return (self.weights * values).sum()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weights={self.weights!r})"

    def __str__(self) -> str:
        if self.weights.ndim == 1:
            return f"{self.__class__.__name__}({vector_to_str(self.weights)})"
        return f"{self.__class__.__name__}(weights of shape {shape_str(self.weights.shape)})"


class Random(Scalarizer):
    r""":math:`\sum_i w_i L_i` with fresh :math:`w = \operatorname{softmax}(\xi)`,
    :math:`\xi \sim \mathcal N(0, I)`, drawn at every call on the losses' device and in their
    dtype (so a seeded run reproduces torchjd's draws).

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> Random()(torch.tensor([0.5, 1.2, 2.0]))
    tensor(0.6251)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        noise = torch.randn(values.numel(), dtype=values.dtype, device=values.device)
        return (torch.softmax(noise, dim=0).reshape(values.shape) * values).sum()


class GeometricMean(Scalarizer):
    r""":math:`\exp\big(\frac1k\sum_i \log L_i\big)` for non-negative losses.

    A negative value raises ``ValueError`` where value checks run (CPU, eager; see
    :func:`jdoptim.aggregation.set_value_checks`): the check reads the data, so it is skipped on
    accelerators and under ``torch.compile``. A zero loss gives 0 with a NaN gradient at that
    entry (as torchjd).

    >>> import torch
    >>> GeometricMean()(torch.tensor([1.0, 4.0]))
    tensor(2.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        # Eager, CPU-only value check (host read allowed there: see the class docstring).
        if should_check_values(values) and bool((values < 0).any()):
            raise ValueError(
                "GeometricMean is only defined for non-negative values. Found a negative value "
                "in the input."
            )
        return torch.exp(torch.log(values).mean())
