"""Base classes: :class:`Aggregator`, :class:`Weighting`, :class:`GeneralizedWeighting`.

An *aggregator* maps a Jacobian ``J`` (``[m, n]``, one row per objective) to a vector of length
``n``. A *weighting* maps a statistic of ``J`` (the matrix itself, or its Gramian ``G = J J^T``) to
``m`` weights. Most aggregators are a weighting followed by ``w @ J``
(:class:`WeightedAggregator`), and the ones whose weights only depend on ``G`` are
:class:`GramianWeightedAggregator`. A *generalized weighting* maps a generalized Gramian of shape
``[m1, ..., mk, mk, ..., m1]`` to weights of shape ``[m1, ..., mk]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .._params import Param, ParamModule  # noqa: F401 - Param is re-exported
from ._checks import check_gramian, check_matrix
from ._gramian import compute_gramian

InputKind = Literal["matrix", "gramian"]


def _call_maybe_without_grad(module: nn.Module, differentiable: bool, *args: Tensor) -> Tensor:
    if differentiable:
        return nn.Module.__call__(module, *args)
    with torch.no_grad():
        return nn.Module.__call__(module, *args)


class Aggregator(ParamModule, ABC):
    r"""Maps a Jacobian :math:`J \in \mathbb{R}^{m \times n}` to an update
    :math:`d \in \mathbb{R}^n`.

    Calling an aggregator validates its input (a 2-D tensor with ``m >= 1`` rows and, where value
    checks run, finite entries: see :mod:`jdoptim.aggregation._checks`) and then runs
    :meth:`forward`. Aggregators whose class attribute ``differentiable`` is ``False`` run under
    :func:`torch.no_grad`, so their output never requires grad.
    """

    differentiable: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, matrix: Tensor, /) -> Tensor:
        check_matrix(matrix)
        return _call_maybe_without_grad(self, self.differentiable, matrix)

    @abstractmethod
    def forward(self, matrix: Tensor, /) -> Tensor:
        """Compute the aggregation of ``matrix`` (already validated)."""

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"

    def __str__(self) -> str:
        return self.__class__.__name__


class Weighting(ParamModule, ABC):
    r"""Maps a matrix statistic to a vector of ``m`` weights.

    ``input_kind`` says what the weighting reads: ``"gramian"`` (a PSD matrix
    :math:`G = J J^\top`, validated as square and symmetric) or ``"matrix"`` (any matrix with
    ``m`` rows, e.g. :class:`MeanWeighting` only reads ``m``). ``w << f`` composes: it returns the
    weighting :math:`x \mapsto w(f(x))`.
    """

    input_kind: ClassVar[InputKind] = "gramian"
    differentiable: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, stat: Tensor, /) -> Tensor:
        if self.input_kind == "gramian":
            check_gramian(stat)
        else:
            check_matrix(stat)
        return _call_maybe_without_grad(self, self.differentiable, stat)

    @abstractmethod
    def forward(self, stat: Tensor, /) -> Tensor:
        """Compute the weights from ``stat`` (already validated)."""

    def __lshift__(self, fn: Callable[[Tensor], Tensor]) -> Weighting:
        return _Composition(self, fn)


class _Composition(Weighting):
    """The weighting ``x -> weighting(fn(x))``."""

    input_kind: ClassVar[InputKind] = "matrix"

    def __init__(self, weighting: Weighting, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.weighting = weighting
        self.fn = fn

    def forward(self, stat: Tensor, /) -> Tensor:
        return self.weighting(self.fn(stat))


class WeightedAggregator(Aggregator):
    r"""Aggregator :math:`J \mapsto w^\top J` with :math:`w` = ``weighting(J)``."""

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        self.weighting = weighting

    def combine(self, weights: Tensor, matrix: Tensor) -> Tensor:
        return weights @ matrix

    def reset(self) -> None:
        """Reset the inner weighting when it is :class:`Stateful` (a no-op otherwise)."""
        inner = getattr(self, "gramian_weighting", self.weighting)
        if isinstance(inner, Stateful):
            inner.reset()

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.combine(self.weighting(matrix), matrix)


class GramianWeightedAggregator(WeightedAggregator):
    r"""Aggregator :math:`J \mapsto w(J J^\top)^\top J` for a Gramian weighting :math:`w`.

    ``self.gramian_weighting`` is the Gramian weighting itself; ``self.weighting`` is its
    composition with :func:`compute_gramian`, so hooks on ``self.weighting`` see the weights.
    """

    def __init__(self, gramian_weighting: Weighting) -> None:
        super().__init__(gramian_weighting << compute_gramian)
        self.gramian_weighting = gramian_weighting


def is_generalized_gramian_shape(shape: torch.Size) -> bool:
    """``True`` when ``shape`` is ``[m1, ..., mk, mk, ..., m1]`` with ``k >= 1``."""
    k, rem = divmod(len(shape), 2)
    return k >= 1 and rem == 0 and tuple(shape[:k]) == tuple(reversed(shape[k:]))


class GeneralizedWeighting(ParamModule, ABC):
    r"""Maps a generalized Gramian of shape ``[m1, ..., mk, mk, ..., m1]`` to weights of shape
    ``[m1, ..., mk]``.

    The generalized Gramian of a tensor :math:`T` of shape ``[m1, ..., mk, n]`` has entry
    ``[a1, ..., ak, bk, ..., b1]`` equal to :math:`\langle T_a, T_b \rangle` (the second index is
    stored reversed).
    """

    differentiable: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, generalized_gramian: Tensor, /) -> Tensor:
        if not isinstance(generalized_gramian, Tensor):
            raise TypeError("Parameter `generalized_gramian` should be a Tensor.")
        if not is_generalized_gramian_shape(generalized_gramian.shape):
            raise ValueError(
                "Parameter `generalized_gramian` should have a shape [m1, ..., mk, mk, ..., m1] "
                f"with k >= 1. Found `generalized_gramian.shape = {generalized_gramian.shape}`."
            )
        return _call_maybe_without_grad(self, self.differentiable, generalized_gramian)

    @abstractmethod
    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        """Compute the weights (same shape as the first half of the input's shape)."""


class Stateful(ABC):
    """Mixin for weightings and aggregators that carry state across calls."""

    @abstractmethod
    def reset(self) -> None:
        """Restore the initial state."""
