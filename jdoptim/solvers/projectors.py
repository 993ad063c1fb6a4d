r"""Dual-cone projectors: torchjd >= 0.11's ``projector=`` objects for UPGrad and DualProj.

A projector maps lower bounds :math:`U \in \mathbb{R}^{k \times m}` and a Gramian
:math:`G \in \mathbb{R}^{m \times m}` to the weights :math:`W` whose row :math:`i` solves
:math:`\min_{v \ge U_{i,:}} \tfrac12 v^\top \hat G v` (see
:func:`jdoptim.solvers.dual_cone.project_weights`), where :math:`\hat G` is :math:`G` divided
by its trace (unless the trace is below ``norm_eps``) plus ``reg_eps`` times the identity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from .dual_cone import Solver, check_non_negative, project_weights


class DualConeProjector(ABC):
    """Base class (torchjd's ``torchjd.linalg.DualConeProjector``): subclass it and implement
    ``__call__(U, G) -> W`` to plug your own solver into UPGrad or DualProj."""

    @abstractmethod
    def __call__(self, lower: Tensor, gramian: Tensor, /) -> Tensor:
        """Project each row of ``lower`` onto the dual cone of ``gramian``."""


class _BuiltinProjector(DualConeProjector):
    solver: Solver

    def __init__(self, *, norm_eps: float = 0.0001, reg_eps: float = 0.0001) -> None:
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    @property
    def norm_eps(self) -> float:
        return self._norm_eps

    @norm_eps.setter
    def norm_eps(self, value: float) -> None:
        check_non_negative("norm_eps", value)
        self._norm_eps = value

    @property
    def reg_eps(self) -> float:
        return self._reg_eps

    @reg_eps.setter
    def reg_eps(self, value: float) -> None:
        check_non_negative("reg_eps", value)
        self._reg_eps = value

    def __call__(self, lower: Tensor, gramian: Tensor, /, init: Tensor | None = None) -> Tensor:
        return project_weights(
            lower,
            gramian,
            norm_eps=self.norm_eps,
            reg_eps=self.reg_eps,
            solver=self.solver,
            init=init,
        )

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and other.norm_eps == self.norm_eps  # type: ignore[attr-defined]
            and other.reg_eps == self.reg_eps  # type: ignore[attr-defined]
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm_eps={self.norm_eps}, reg_eps={self.reg_eps})"


class TorchProjector(_BuiltinProjector):
    """jdoptim's sync-free, compilable solver (``solver="torch"``, the default of UPGrad and
    DualProj), as a projector object.

    >>> import torch
    >>> TorchProjector()(torch.eye(2), torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))
    tensor([[1.0000, 0.2500],
            [0.9995, 1.0000]])
    """

    solver: Solver = "torch"


class QuadprogProjector(_BuiltinProjector):
    """torchjd's projector (``torchjd.linalg.QuadprogProjector``): the exact quadprog solver on
    the CPU (``solver="quadprog"``; eager only, synchronises).

    >>> import torch
    >>> QuadprogProjector()(torch.eye(2), torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))
    tensor([[1.0000, 0.2500],
            [0.9995, 1.0000]])
    """

    solver: Solver = "quadprog"
