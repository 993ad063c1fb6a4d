r"""Scalarizations with trainable parameters: :class:`UW` and :class:`IMTLL`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..aggregation._base import Stateful
from ._base import Scalarizer, check_shape_matches, shape_str


def _as_shape(shape: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)


class _LearnedScales(Scalarizer, Stateful):
    """A scalarizer owning one float32 parameter of the losses' shape (zeros at the start)."""

    _what: str
    trains_with_model = True

    def __init__(self, shape: int | tuple[int, ...] | list[int], name: str) -> None:
        super().__init__()
        self._shape = _as_shape(shape)
        self._name = name
        self.register_parameter(name, nn.Parameter(torch.zeros(self._shape)))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the losses (fixed: the parameter is created with it)."""
        return self._shape

    def reset(self) -> None:
        """Zero the parameter in place (it stays the same Parameter, e.g. in an optimiser)."""
        with torch.no_grad():
            getattr(self, self._name).zero_()

    def _scales(self, values: Tensor) -> Tensor:
        check_shape_matches(values, self._shape, self._what)
        return getattr(self, self._name)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(shape={shape_str(self._shape)})"


class UW(_LearnedScales):
    r"""Uncertainty weighting (Kendall et al., 2018):
    :math:`\sum_i \tfrac12 e^{-s_i} L_i + \tfrac12 s_i` with trainable log-variances
    :math:`s` (``log_var``, float32 zeros).

    The parameters must be trained with the model. With :class:`jdoptim.JDOptimizer`, add them
    to a param group of the inner optimiser (``JDOptimizer(opt, UW(3))`` does that for you when
    ``opt`` is built over the model only; see :doc:`/scalarization/index`).

    >>> import torch
    >>> UW(3)(torch.tensor([0.5, 1.2, 2.0]))
    tensor(1.8500, grad_fn=<SumBackward0>)
    """

    _what = "log-variances"

    def __init__(self, shape: int | tuple[int, ...] | list[int]) -> None:
        super().__init__(shape, "log_var")

    def forward(self, values: Tensor, /) -> Tensor:
        s = self._scales(values)
        return (0.5 * torch.exp(-s) * values + 0.5 * s).sum()


class IMTLL(_LearnedScales):
    r"""IMTL-L (Liu et al., 2021), the loss-balancing part of IMTL:
    :math:`\sum_i e^{s_i} L_i - s_i` with trainable log-scales :math:`s` (``log_scale``,
    float32 zeros), trained with the model (see :class:`UW`).

    >>> import torch
    >>> IMTLL(3)(torch.tensor([0.5, 1.2, 2.0]))
    tensor(3.7000, grad_fn=<SumBackward0>)
    """

    _what = "scales"

    def __init__(self, shape: int | tuple[int, ...] | list[int]) -> None:
        super().__init__(shape, "log_scale")

    def forward(self, values: Tensor, /) -> Tensor:
        s = self._scales(values)
        return (torch.exp(s) * values - s).sum()
