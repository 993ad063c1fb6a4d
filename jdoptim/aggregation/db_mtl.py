r"""DB-MTL (Lin et al., 2023, *Dual-Balancing for Multi-Task Learning*): balance the loss
scales with a log transform and the gradient magnitudes by rescaling to the largest."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregator, Param, Stateful, Weighting
from ._losses import LossAware, decayed
from ._state import LazyState
from ._validate import in_unit_interval, non_negative

_EPS = 1e-8


class DBMTLWeighting(LossAware, Weighting):
    r"""Stateless DB-MTL (``beta = 0``) as a Gramian weighting.

    The gradients of :math:`\log(L_i + 10^{-8})` are :math:`g_i / (L_i + 10^{-8})`, with
    Gramian :math:`G' = DGD`, :math:`D = \operatorname{diag}(1/(L + 10^{-8}))`. Scaling each to
    the largest norm, :math:`\alpha_i = \max_j \sqrt{G'_{jj}} / (\sqrt{G'_{ii}} + 10^{-8})`,
    gives the weights :math:`w_i = \alpha_i / (L_i + 10^{-8})` on the raw Jacobian. Needs the
    losses (:meth:`observe_losses`; ``JDOptimizer`` passes them) and the Gramian's diagonal
    only; :math:`O(m)`, sync-free, not differentiable. For the momentum of the paper
    (``beta > 0``) use the aggregator :class:`DBMTL`.

    >>> import torch
    >>> w = DBMTLWeighting()
    >>> w.observe_losses(torch.tensor([1.0, 0.5]))
    >>> w(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # log-gradient norms 2 and 2: alpha = 1
    tensor([1., 2.])
    """

    differentiable = False

    def __init__(self) -> None:
        super().__init__()
        self.init_losses()

    def forward(self, stat: Tensor, /) -> Tensor:
        scale = 1 / (self.current_losses(stat.shape[0], stat) + _EPS)
        norms = stat.diagonal().clamp(min=0).sqrt() * scale
        return norms.amax() / (norms + _EPS) * scale


class DBMTL(LossAware, LazyState, Aggregator, Stateful):
    r"""DB-MTL with momentum, from the Jacobian and the losses.

    At call :math:`t = 1, 2, \dots`, with the log-loss gradients
    :math:`\tilde g_i = g_i / (L_i + 10^{-8})`:

    .. math::
        B_i \leftarrow (1 - \beta_t)\tilde g_i + \beta_t B_i, \quad
        \beta_t = \beta / t^{\beta_\sigma}, \qquad
        \alpha_i = \frac{\max_j \|B_j\|}{\|B_i\| + 10^{-8}}, \qquad d = \sum_i \alpha_i B_i,

    with :math:`B = 0` at the start and no bias correction: LibMTL's ``DB_MTL`` step for step,
    with its defaults and its :math:`10^{-8}` terms (``tests/aggregation/test_libmtl_parity.py``
    checks it against autograd of :math:`\log(L_i + 10^{-8})`). The one difference is where it
    applies: LibMTL combines the gradients of the shared parameters and gives the task-specific
    ones the plain gradient of :math:`\sum_i \log(L_i + 10^{-8})`; here every JD parameter
    gets :math:`d` (``JDOptimizer(..., params=shared)`` restricts it; the others then get the
    gradient of the raw losses, not of their logs). With
    :math:`\beta > 0` the update is not a combination of the current rows, so this needs the
    Jacobian (``JDOptimizer`` materialises it) and keeps an ``[m, n]`` state; with
    ``beta = 0`` use :class:`DBMTLWeighting` (Gramian only). Needs the losses
    (:meth:`observe_losses`). Stateful (:meth:`reset`), sync-free, not differentiable.

    :param beta: Momentum :math:`\beta \in [0, 1]` (LibMTL's default 0.9).
    :param beta_sigma: Decay exponent :math:`\beta_\sigma \ge 0` (default 0).

    >>> import torch
    >>> agg = DBMTL(beta=0.0)
    >>> agg.observe_losses(torch.tensor([1.0, 0.5]))
    >>> agg(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    tensor([2., 2.])
    """

    differentiable = False
    state_buffers = ("_momentum", "_step")
    beta = Param(in_unit_interval("beta"))
    beta_sigma = Param(non_negative("beta_sigma"))

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.init_state()
        self.init_losses()

    def reset(self) -> None:
        """Forget the momentum."""
        self.clear_state()

    def forward(self, matrix: Tensor, /) -> Tensor:
        losses = self.current_losses(matrix.shape[0], matrix)
        if self._momentum is None or self._momentum.shape != matrix.shape:
            self._momentum = torch.zeros_like(matrix)
            # int64: an in-place add on a 0-d float64 buffer is lost under torch.compile (2.13).
            self._step = torch.zeros((), dtype=torch.int64, device=matrix.device)
        self._step.add_(1)
        beta = decayed(self.beta, self.beta_sigma, self._step.to(torch.float64)).to(matrix.dtype)
        log_grads = matrix / (losses + _EPS).unsqueeze(1)
        momentum = (1 - beta) * log_grads + beta * self._momentum
        self._momentum.copy_(momentum)
        norms = momentum.norm(dim=1)
        return (norms.amax() / (norms + _EPS)) @ momentum

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(beta={self.beta!r}, beta_sigma={self.beta_sigma!r})"
