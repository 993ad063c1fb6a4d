"""Shared plumbing of the dual-cone methods (UPGrad, DualProj): parameters, validation,
warm start, ``repr``/``str``. The math lives in :mod:`jdoptim.solvers.dual_cone`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..solvers.dual_cone import Solver, check_non_negative, check_solver, project_weights
from ._base import GramianWeightedAggregator, Stateful, Weighting
from ._format import pref_vector_to_str_suffix
from ._pref import pref_vector_to_weighting
from .mean import MeanWeighting


class DualConeWeighting(Weighting, Stateful):
    """Base of :class:`UPGradWeighting` and :class:`DualProjWeighting`.

    Holds the preference weighting in ``self.weighting`` and projects lower bounds onto the dual
    cone with :meth:`project`, optionally warm-started from the previous call.
    """

    differentiable = False

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float | None = None,
        reg_eps: float = 0.0001,
        solver: Solver = "torch",
        warm_start: bool = False,
    ) -> None:
        super().__init__()
        check_non_negative("norm_eps", norm_eps)
        check_non_negative("reg_eps", reg_eps)
        check_solver(solver)
        self.weighting = pref_vector_to_weighting(pref_vector, default=MeanWeighting())
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.solver = solver
        self.warm_start = warm_start
        self.register_buffer("_previous", torch.empty(0), persistent=False)

    def reset(self) -> None:
        """Forget the warm-start solution."""
        self._previous = torch.empty(0, device=self._previous.device)

    def project(self, lower: Tensor, gramian: Tensor) -> Tensor:
        """Project each row of ``lower`` onto the dual cone of ``gramian`` (see
        :func:`~jdoptim.solvers.dual_cone.project_weights`)."""
        init = None
        if self.warm_start and self._previous.shape == lower.shape:
            init = self._previous
        W = project_weights(
            lower,
            gramian,
            norm_eps=self.norm_eps,
            reg_eps=self.reg_eps,
            solver=self.solver,
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

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float | None = None,
        reg_eps: float = 0.0001,
        solver: Solver = "torch",
        warm_start: bool = False,
    ) -> None:
        super().__init__(self.weighting_class(pref_vector, norm_eps, reg_eps, solver, warm_start))
        self._pref_vector = pref_vector

    def __repr__(self) -> str:
        w = self.gramian_weighting
        extra = ", warm_start=True" if w.warm_start else ""
        return (
            f"{self.__class__.__name__}(pref_vector={self._pref_vector!r}, norm_eps="
            f"{w.norm_eps}, reg_eps={w.reg_eps}, solver={w.solver!r}{extra})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_to_str_suffix(self._pref_vector)}"
