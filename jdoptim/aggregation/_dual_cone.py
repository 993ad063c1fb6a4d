"""Shared plumbing of the dual-cone methods (UPGrad, DualProj): parameters, validation,
warm start, ``repr``/``str``. The math lives in :mod:`jdoptim.solvers.dual_cone`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..solvers.dual_cone import Solver, check_non_negative, check_solver, project_weights
from ..solvers.projectors import DualConeProjector, _BuiltinProjector
from ._base import GramianWeightedAggregator, Param, Stateful, Weighting
from ._format import pref_vector_to_str_suffix
from ._pref import pref_vector_param
from .constant import ConstantWeighting
from .mean import MeanWeighting


def _non_negative(name: str, value: float) -> float:
    check_non_negative(name, value)
    return value


def _checked_solver(solver: Solver) -> Solver:
    check_solver(solver)
    return solver


class DualConeWeighting(Weighting, Stateful):
    """Base of :class:`UPGradWeighting` and :class:`DualProjWeighting`.

    Holds the preference weighting in ``self.weighting`` and projects lower bounds onto the dual
    cone with :meth:`project`, optionally warm-started from the previous call.
    """

    differentiable = False
    pref_vector = pref_vector_param(MeanWeighting)
    norm_eps = Param(lambda v: _non_negative("norm_eps", v))
    reg_eps = Param(lambda v: _non_negative("reg_eps", v))
    solver = Param(lambda v: _checked_solver(v))
    warm_start = Param(bool)
    projector = Param()  # torchjd >= 0.11; None: norm_eps/reg_eps/solver (not checked, as torchjd)

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float | None = None,
        reg_eps: float = 0.0001,
        solver: Solver = "torch",
        warm_start: bool = False,
        projector: DualConeProjector | None = None,
    ) -> None:
        super().__init__()
        if isinstance(norm_eps, DualConeProjector):  # torchjd >= 0.11: (pref_vector, projector)
            projector, norm_eps = norm_eps, 0.0001
        self.projector = projector
        self.pref_vector = pref_vector
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.solver = solver
        self.warm_start = warm_start
        self.register_buffer("_previous", torch.empty(0), persistent=False)

    def preferences(self, stat: Tensor) -> Tensor:
        """The preference weights :math:`p` for ``stat`` (already validated by this call): the
        built-in ones without a second validation of ``stat``, any other weighting through its
        ``__call__``."""
        weighting = self.weighting
        if type(weighting) in (MeanWeighting, ConstantWeighting):
            return weighting.forward(stat)
        return weighting(stat)

    def reset(self) -> None:
        """Forget the warm-start solution."""
        self._previous = torch.empty(0, device=self._previous.device)

    def project(self, lower: Tensor, gramian: Tensor) -> Tensor:
        """Project each row of ``lower`` onto the dual cone of ``gramian`` (see
        :func:`~jdoptim.solvers.dual_cone.project_weights`)."""
        if self.projector is not None and not isinstance(self.projector, _BuiltinProjector):
            return self.projector(lower, gramian)  # a user's DualConeProjector
        init = None
        if self.warm_start and self._previous.shape == lower.shape:
            init = self._previous
        # A built-in projector (TorchProjector, QuadprogProjector) takes precedence.
        settings = self if self.projector is None else self.projector
        W = project_weights(
            lower,
            gramian,
            norm_eps=settings.norm_eps,
            reg_eps=settings.reg_eps,
            solver=settings.solver,
            init=init,
        )
        if self.warm_start:
            if init is None:
                self._previous = W.detach().clone()
            else:
                self._previous.copy_(W)
        return W


class DualConeAggregator(GramianWeightedAggregator):
    """Base of :class:`UPGrad` and :class:`DualProj`: the ``repr``/``str`` of their parameters."""

    differentiable = False
    weighting_class: ClassVar[type[DualConeWeighting]]
    pref_vector = Param(forward="gramian_weighting")
    norm_eps = Param(forward="gramian_weighting")
    reg_eps = Param(forward="gramian_weighting")
    solver = Param(forward="gramian_weighting")
    warm_start = Param(forward="gramian_weighting")
    projector = Param(forward="gramian_weighting")

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float | None = None,
        reg_eps: float = 0.0001,
        solver: Solver = "torch",
        warm_start: bool = False,
        projector: DualConeProjector | None = None,
    ) -> None:
        super().__init__(
            self.weighting_class(pref_vector, norm_eps, reg_eps, solver, warm_start, projector)
        )

    def __repr__(self) -> str:
        w = self.gramian_weighting
        extra = ", warm_start=True" if w.warm_start else ""
        if w.projector is not None:
            extra += f", projector={w.projector!r}"
        return (
            f"{self.__class__.__name__}(pref_vector={self.pref_vector!r}, norm_eps="
            f"{w.norm_eps}, reg_eps={w.reg_eps}, solver={w.solver!r}{extra})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_to_str_suffix(self.pref_vector)}"
