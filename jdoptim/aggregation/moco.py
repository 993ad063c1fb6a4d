r"""MoCo (Fernando et al., ICLR 2023): multi-objective gradient correction with a tracked
Jacobian and weights updated by one step per call."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregator, Param, Stateful
from ._losses import LossAware, decayed
from ._state import LazyState
from ._validate import non_negative

_EPS = 1e-8


class MoCo(LossAware, LazyState, Aggregator, Stateful):
    r"""MoCo from the Jacobian (and the losses, with ``normalize=True``).

    At call :math:`t = 1, 2, \dots`, with :math:`\beta_t = \beta / t^{\beta_\sigma}`,
    :math:`\gamma_t = \gamma / t^{\gamma_\sigma}` and the rows :math:`h_i` of :math:`H`
    (:math:`h_i = L_i\, g_i / (\|g_i\| + 10^{-8})` with ``normalize=True``, else
    :math:`h_i = g_i`):

    .. math::
        Y \leftarrow Y - \beta_t (Y - H), \qquad
        \lambda \leftarrow \operatorname{softmax}\big(\lambda - \gamma_t (Y Y^\top + \rho I)
        \lambda\big), \qquad d = Y^\top \lambda,

    from :math:`Y = 0`, :math:`\lambda = \mathbb 1/m`. The paper projects :math:`\lambda` onto
    the simplex; like LibMTL and torchjd's draft this uses the softmax (smooth, never exactly
    zero). The paper's algorithm tracks the raw gradients :math:`g_i`; LibMTL (from the
    authors' code) rescales each to :math:`L_i g_i / (\|g_i\| + 10^{-8})` first, and that is
    the default here, so the defaults reproduce LibMTL's ``MoCo`` step for step (its defaults
    too); ``normalize=False`` gives the paper's form (and torchjd's draft), which needs no
    losses. With ``normalize=True`` call :meth:`observe_losses` before each call
    (``JDOptimizer`` does it). ``tests/aggregation/test_libmtl_parity.py`` checks the defaults
    against an eager re-statement of LibMTL's rule. As for every method here, LibMTL applies it
    to the shared parameters only (its task-specific ones get the gradient of
    :math:`\sum_i L_i`): ``JDOptimizer(..., params=shared, other_params_grad="sum")``.

    :math:`Y Y^\top` comes from the tracked :math:`Y`, not from the current Gramian, so MoCo
    needs the Jacobian (``JDOptimizer`` materialises it) and keeps an ``[m, n]`` state: about
    the memory of one extra Jacobian and :math:`O(m^2 n)` per call. Stateful (:meth:`reset`;
    the state restarts when the shape, dtype or device changes), sync-free, not differentiable.

    :param beta: Tracking rate :math:`\beta \ge 0` (default 0.5).
    :param beta_sigma: Its decay exponent (default 0.5).
    :param gamma: Weight step :math:`\gamma \ge 0` (default 0.1).
    :param gamma_sigma: Its decay exponent (default 0.5).
    :param rho: Ridge :math:`\rho \ge 0` (default 0).
    :param normalize: Rescale each gradient to :math:`L_i g_i / (\|g_i\| + 10^{-8})` (LibMTL's
        default, needs the losses) or track the raw gradients (``False``, the paper).

    >>> import torch
    >>> MoCo(normalize=False)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1891, 0.5000, 0.5000])
    >>> moco = MoCo()
    >>> moco.observe_losses(torch.tensor([1.0, 2.0]))
    >>> moco(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # h = [0.6, 0.8], [0, 2]; Y = H / 2
    tensor([0.1528, 0.6944])
    """

    differentiable = False
    state_buffers = ("_tracked", "_weights", "_step")
    beta = Param(non_negative("beta"))
    beta_sigma = Param(non_negative("beta_sigma"))
    gamma = Param(non_negative("gamma"))
    gamma_sigma = Param(non_negative("gamma_sigma"))
    rho = Param(non_negative("rho"))
    normalize = Param(bool)

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho
        self.normalize = normalize
        self.init_state()
        self.init_losses()

    def reset(self) -> None:
        """Forget the tracked Jacobian and the weights."""
        self.clear_state()

    def forward(self, matrix: Tensor, /) -> Tensor:
        m = matrix.shape[0]
        y = self._tracked
        if (
            y is None
            or y.shape != matrix.shape
            or y.dtype != matrix.dtype
            or (y.device != matrix.device)
        ):
            self._tracked = torch.zeros_like(matrix)
            self._weights = torch.full((m,), 1.0 / m, dtype=matrix.dtype, device=matrix.device)
            # int64: an in-place add on a 0-d float64 buffer is lost under torch.compile (2.13).
            self._step = torch.zeros((), dtype=torch.int64, device=matrix.device)
        self._step.add_(1)
        beta = decayed(self.beta, self.beta_sigma, self._step.to(torch.float64)).to(matrix.dtype)
        gamma = decayed(self.gamma, self.gamma_sigma, self._step.to(torch.float64)).to(matrix.dtype)
        if self.normalize:
            norms = matrix.norm(dim=1, keepdim=True)
            losses = self.current_losses(m, matrix).unsqueeze(1)
            matrix = matrix / (norms + _EPS) * losses
        tracked = self._tracked - beta * (self._tracked - matrix)
        lam = self._weights
        grad = tracked @ (tracked.mT @ lam) + self.rho * lam
        lam = torch.softmax(lam - gamma * grad, dim=0)
        self._tracked.copy_(tracked)
        self._weights.copy_(lam)
        return lam @ tracked

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(beta={self.beta!r}, beta_sigma={self.beta_sigma!r}, "
            f"gamma={self.gamma!r}, gamma_sigma={self.gamma_sigma!r}, rho={self.rho!r}, "
            f"normalize={self.normalize!r})"
        )
