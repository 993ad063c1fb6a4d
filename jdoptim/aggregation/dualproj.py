r"""DualProj: the preference-weighted combination of the rows, projected onto the dual cone."""

from __future__ import annotations

from torch import Tensor

from ._dual_cone import DualConeAggregator, DualConeWeighting


class DualProjWeighting(DualConeWeighting):
    r"""Weights :math:`w = \operatorname{Project}(p, G)`: one dual-cone projection.

    With preference weights :math:`p` (default :math:`\tfrac1m \mathbb{1}`) and
    :math:`\hat G = \operatorname{normalize}(G) + \varepsilon_r I`,

    .. math::

        w = \operatorname*{arg\,min}_{v \geq p} \tfrac12 v^\top \hat G v,

    i.e. :math:`J^\top w` is the projection of :math:`J^\top p` onto the dual cone
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
    >>> DualProjWeighting()(J @ J.T)
    tensor([0.6109, 0.5000])
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        return self.project(self.preferences(stat), stat)


class DualProj(DualConeAggregator):
    r"""Aggregator :math:`J \mapsto \pi_J(J^\top p)`: the preference-weighted combination of the
    rows is projected onto the dual cone :math:`\{x : Jx \geq 0\}` (weights from
    :class:`DualProjWeighting`). The result never conflicts with any row (up to the ridge
    ``reg_eps``). Not differentiable.

    >>> import torch
    >>> DualProj()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5563, 1.1109, 1.1109])
    """

    weighting_class = DualProjWeighting
