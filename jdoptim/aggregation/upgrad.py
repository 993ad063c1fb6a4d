r"""UPGrad: the sum of the preference-scaled rows, each projected onto the dual cone."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dual_cone import DualConeAggregator, DualConeWeighting


class UPGradWeighting(DualConeWeighting):
    r"""Weights :math:`w = \sum_i W_{i,:}` with
    :math:`W = \operatorname{Project}(\operatorname{diag}(p), G)`.

    With preference weights :math:`p` (default :math:`\tfrac1m \mathbb{1}`) and
    :math:`\hat G = \operatorname{normalize}(G) + \varepsilon_r I`, row :math:`i` of :math:`W` is

    .. math::

        W_{i,:} = \operatorname*{arg\,min}_{v \geq p_i e_i} \tfrac12 v^\top \hat G v,

    i.e. :math:`J^\top W_{i,:}` is the projection of :math:`p_i g_i` onto the dual cone
    :math:`\{x : Jx \geq 0\}` (see :func:`jdoptim.solvers.dual_cone.project_weights`).

    :param pref_vector: preference weights :math:`p` (1-D), or ``None`` for :math:`\tfrac1m`.
    :param norm_eps: the Gramian is divided by its trace unless the trace is below this;
        ``None`` (default): unless the trace is below the smallest normal number of its dtype,
        so that the weights do not change when :math:`G` is scaled (torchjd's ``1e-4`` is an
        absolute threshold; see :mod:`jdoptim.solvers.normalization`).
    :param reg_eps: ridge :math:`\varepsilon_r` added to the normalised Gramian.
    :param solver: ``"torch"`` (exact, sync-free, compilable; default), ``"mprgp"`` (the former
        fixed-budget default) or ``"quadprog"`` (reference, CPU); see
        :mod:`jdoptim.solvers.dual_cone`.
    :param warm_start: start the solver from the previous call's solution when the
        number of objectives is unchanged (state kept in a non-persistent buffer, cleared by
        :meth:`reset`). The weights are the same; when consecutive Gramians are close (training
        on slowly changing gradients), far fewer iterations are needed.

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> UPGradWeighting()(J @ J.T)
    tensor([1.1109, 0.7894])
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        p = self.preferences(stat)
        return self.project(torch.diag(p), stat).sum(0)


class UPGrad(DualConeAggregator):
    r"""Aggregator :math:`J \mapsto \sum_i \pi_{J}(p_i g_i)`: each row :math:`g_i`, scaled by its
    preference weight, is projected onto the dual cone :math:`\{x : Jx \geq 0\}` and the
    projections are summed (weights from :class:`UPGradWeighting`). The result never conflicts
    with any row (up to the ridge ``reg_eps``). Not differentiable.

    >>> import torch
    >>> UPGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2929, 1.9004, 1.9004])
    """

    weighting_class = UPGradWeighting
