"""The :class:`Scalarizer` base class and shared checks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor

from .._params import ParamModule


def shape_str(shape: tuple[int, ...]) -> str:
    """``(3,)``, ``(2, 3)``: a shape as torchjd prints it in messages and reprs."""
    return str(tuple(shape))


class Scalarizer(ParamModule, ABC):
    r"""Maps a tensor of loss values :math:`L` (any shape, including 0-d) to a 0-d loss.

    A scalarizer is differentiable: ``scalarizer(losses).backward()`` trains the model (and any
    parameters of the scalarizer itself, e.g. :class:`UW`'s log-variances). It is the
    loss-level counterpart of an aggregator: no Jacobian, no Gramian, one ordinary backward.
    :class:`jdoptim.JDOptimizer` accepts one in place of an aggregator.
    """

    trains_with_model: ClassVar[bool] = False
    """Whether the parameters are trained by the model's optimiser (:class:`UW`,
    :class:`IMTLL`); :class:`jdoptim.JDOptimizer` then adds them to a param group."""

    def __call__(self, values: Tensor, /) -> Tensor:
        if not isinstance(values, Tensor):
            raise TypeError(
                f"Parameter `values` should be a Tensor. Found `{type(values).__name__}`."
            )
        return super().__call__(values)

    @abstractmethod
    def forward(self, values: Tensor, /) -> Tensor:
        """Return the scalarized loss (0-d)."""

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"

    def __str__(self) -> str:
        return self.__class__.__name__


def check_same_shape(name: str, tensor: Tensor | None, values: Tensor) -> None:
    if tensor is not None and tensor.shape != values.shape:
        raise ValueError(
            f"Parameter `{name}` should have the same shape as `values`. Found "
            f"`{name}.shape = {shape_str(tensor.shape)}` and `values.shape = "
            f"{shape_str(values.shape)}`."
        )


def check_shape_matches(values: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(values.shape) != tuple(shape):
        raise ValueError(
            f"Parameter `values` should have shape {shape_str(shape)} (matching the shape of the "
            f"{what}). Found `values.shape = {shape_str(values.shape)}`."
        )


def non_negative(name: str):
    def check(value: float) -> float:
        if value < 0:
            raise ValueError(
                f"Parameter `{name}` should be non-negative. Found `{name} = {value}`."
            )
        return value

    return check


def strictly_positive(name: str):
    def check(value: float) -> float:
        if not value > 0:
            raise ValueError(
                f"Parameter `{name}` should be strictly positive. Found `{name} = {value}`."
            )
        return value

    return check


def optional_tensor(name: str):
    def check(value: Tensor | None) -> Tensor | None:
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"Parameter `{name}` should be a Tensor or None.")
        return value

    return check
