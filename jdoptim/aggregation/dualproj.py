r"""DualProj: the preference-weighted combination of the rows, projected onto the dual cone."""

from __future__ import annotations

from torch import Tensor

from ..solvers.dual_cone import Solver, check_non_negative, check_solver, project_weights
from ._base import GramianWeightedAggregator, Weighting
from ._format import pref_vector_to_str_suffix
from ._pref import pref_vector_to_weighting
from .mean import MeanWeighting


class DualProjWeighting(Weighting):
    r"""Weights :math:`w = \operatorname{Project}(p, G)`: one dual-cone projection.

    With preference weights :math:`p` (default :math:`\tfrac1m \mathbb{1}`) and
    :math:`\hat G = \operatorname{normalize}(G) + \varepsilon_r I`,

    .. math::

        w = \operatorname*{arg\,min}_{v \geq p} \tfrac12 v^\top \hat G v,

    i.e. :math:`J^\top w` is the projection of :math:`J^\top p` onto the dual cone
    :math:`\{x : Jx \geq 0\}` (see :func:`jdoptim.solvers.dual_cone.project_weights`).

    :param pref_vector: preference weights :math:`p` (1-D), or ``None`` for :math:`\tfrac1m`.
    :param norm_eps: the Gramian is divided by its trace unless the trace is below this.
    :param reg_eps: ridge :math:`\varepsilon_r` added to the normalised Gramian.
    :param solver: ``"torch"`` (sync-free, compilable; default) or ``"quadprog"`` (exact, CPU).

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> DualProjWeighting()(J @ J.T)
    tensor([0.6109, 0.5000])
    """

    differentiable = False

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
        solver: Solver = "torch",
    ) -> None:
        super().__init__()
        check_non_negative("norm_eps", norm_eps)
        check_non_negative("reg_eps", reg_eps)
        check_solver(solver)
        self._pref_vector = pref_vector
        self.weighting = pref_vector_to_weighting(pref_vector, default=MeanWeighting())
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.solver = solver

    def forward(self, stat: Tensor, /) -> Tensor:
        p = self.weighting(stat)
        return project_weights(
            p, stat, norm_eps=self.norm_eps, reg_eps=self.reg_eps, solver=self.solver
        )


class DualProj(GramianWeightedAggregator):
    r"""Aggregator :math:`J \mapsto \pi_J(J^\top p)`: the preference-weighted combination of the
    rows is projected onto the dual cone :math:`\{x : Jx \geq 0\}` (weights from
    :class:`DualProjWeighting`). The result never conflicts with any row (up to the ridge
    ``reg_eps``). Not differentiable.

    >>> import torch
    >>> DualProj()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5563, 1.1109, 1.1109])
    """

    differentiable = False

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
        solver: Solver = "torch",
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, norm_eps, reg_eps, solver))
        self._pref_vector = pref_vector
        self._norm_eps = norm_eps
        self._reg_eps = reg_eps
        self._solver = solver

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(pref_vector={self._pref_vector!r}, norm_eps="
            f"{self._norm_eps}, reg_eps={self._reg_eps}, solver={self._solver!r})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_to_str_suffix(self._pref_vector)}"
