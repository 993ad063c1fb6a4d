r"""MoDo (Chen et al., JMLR 2024): projected gradient steps on the simplex weights, from the
cross-batch product :math:`A = J_1 J_2^\top` of two independent mini-batches."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.simplex_projection import project_onto_simplex
from ._base import Param, Stateful, Weighting
from ._state import LazyState
from ._validate import non_negative, positive


class MoDoWeighting(LazyState, Weighting, Stateful):
    r"""MoDo weights (torchjd 0.18's ``MoDoWeighting``): one projected step per call,

    .. math::
        \lambda \leftarrow \Pi_{\Delta}\big(\lambda - \gamma (A\lambda + \rho\lambda)\big),

    with :math:`\lambda = \mathbb{1}/m` at the start and :math:`\Pi_\Delta` the projection onto
    the simplex (:func:`~jdoptim.solvers.simplex_projection.project_onto_simplex`, which keeps
    torchjd's all-zero result for entries too large to subtract 1 from). The input is
    :math:`A = J_1 J_2^\top` from two independent mini-batches (not necessarily symmetric), or
    the Gramian :math:`J J^\top` as a biased substitute.

    Stateful: :math:`\lambda` (input dtype and device) restarts silently when the number of
    objectives, the dtype or the device changes, and at :meth:`reset`. Not differentiable.
    Sync-free and ``torch.compile``-friendly. Returns a copy of the state (torchjd returns the
    state tensor itself).

    :param gamma: Step size :math:`\gamma > 0`.
    :param rho: Ridge :math:`\rho \ge 0`.

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> MoDoWeighting()(J @ J.T)
    tensor([1., 0.])
    """

    input_kind = "matrix"
    differentiable = False
    state_buffers = ("_lambda",)
    gamma = Param(positive("gamma"))
    rho = Param(non_negative("rho"))

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma
        self.rho = rho
        self.init_state()

    def reset(self) -> None:
        """Restart from uniform weights at the next call."""
        self.clear_state()

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        lam = self._lambda
        if lam is None or lam.shape[0] != m or lam.dtype != stat.dtype or lam.device != stat.device:
            lam = torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
            self._lambda = lam
        new = project_onto_simplex(lam - self.gamma * (stat @ lam + self.rho * lam))
        lam.copy_(new)
        return new

    def extra_repr(self) -> str:
        return f"gamma={self.gamma!r}, rho={self.rho!r}"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"
