r"""UPGrad: the sum of the preference-scaled rows, each projected onto the dual cone."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.dual_cone import Solver, check_non_negative, check_solver, project_weights
from ._base import GramianWeightedAggregator, Weighting
from ._format import pref_vector_to_str_suffix
from ._pref import pref_vector_to_weighting
from .mean import MeanWeighting


class UPGradWeighting(Weighting):
    r"""Weights :math:`w = \sum_i W_{i,:}` with
    :math:`W = \operatorname{Project}(\operatorname{diag}(p), G)`.

    With preference weights :math:`p` (default :math:`\tfrac1m \mathbb{1}`) and
    :math:`\hat G = \operatorname{normalize}(G) + \varepsilon_r I`, row :math:`i` of :math:`W` is

    .. math::

        W_{i,:} = \operatorname*{arg\,min}_{v \geq p_i e_i} \tfrac12 v^\top \hat G v,

    i.e. :math:`J^\top W_{i,:}` is the projection of :math:`p_i g_i` onto the dual cone
    :math:`\{x : Jx \geq 0\}` (see :func:`jdoptim.solvers.dual_cone.project_weights`).

    :param pref_vector: preference weights :math:`p` (1-D), or ``None`` for :math:`\tfrac1m`.
    :param norm_eps: the Gramian is divided by its trace unless the trace is below this.
    :param reg_eps: ridge :math:`\varepsilon_r` added to the normalised Gramian.
    :param solver: ``"torch"`` (sync-free, compilable; default) or ``"quadprog"`` (exact, CPU).

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> UPGradWeighting()(J @ J.T)
    tensor([1.1109, 0.7894])
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
        W = project_weights(
            torch.diag(p), stat, norm_eps=self.norm_eps, reg_eps=self.reg_eps, solver=self.solver
        )
        return W.sum(0)


class UPGrad(GramianWeightedAggregator):
    r"""Aggregator :math:`J \mapsto \sum_i \pi_{J}(p_i g_i)`: each row :math:`g_i`, scaled by its
    preference weight, is projected onto the dual cone :math:`\{x : Jx \geq 0\}` and the
    projections are summed (weights from :class:`UPGradWeighting`). The result never conflicts
    with any row (up to the ridge ``reg_eps``). Not differentiable.

    >>> import torch
    >>> UPGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2929, 1.9004, 1.9004])
    """

    differentiable = False

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
        solver: Solver = "torch",
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, norm_eps, reg_eps, solver))
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
