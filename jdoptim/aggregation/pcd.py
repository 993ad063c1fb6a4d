r"""PCD: a primary objective (row 0) improved under per-task progress constraints on the others,
with adaptively normalised gradients (torchjd 0.18's ``PCD``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.pcd import pcd_dual_qp
from ._base import GramianWeightedAggregator, Param, Stateful, Weighting
from ._state import LazyState
from ._validate import in_unit_interval

_QP_TOL = 1e-9


def _check_tau(tau: float | Tensor) -> float | Tensor:
    # Validation reads the values of a tensor tau once, eagerly (not on the hot path).
    if isinstance(tau, Tensor):
        if tau.ndim != 1:
            raise ValueError(
                "Attribute `tau` must be a float or a vector (1D Tensor). Found "
                f"`tau.ndim = {tau.ndim}`."
            )
        if not bool(((tau >= 0) & (tau <= 1)).all()):
            raise ValueError(f"Attribute `tau` must be in [0, 1]. Found tau={tau!r}.")
        return tau
    if not 0 <= tau <= 1:
        raise ValueError(f"Attribute `tau` must be in [0, 1]. Found tau={tau!r}.")
    return tau


def _check_eps(eps: float) -> float:
    if not eps >= 0:
        raise ValueError(f"Attribute `eps` must be non-negative. Found eps={eps!r}.")
    return eps


class PCDWeighting(LazyState, Weighting, Stateful):
    r"""PCD weights (torchjd 0.18's ``PCDWeighting``), from the Gramian. Row 0 is the primary
    objective; the others are constrained.

    With :math:`q = \operatorname{diag} G`, an EMA :math:`v \leftarrow \beta v + (1-\beta) q`
    with bias correction :math:`\hat v = v/(1-\beta^k)` gives the scales
    :math:`s_i = 1/\sqrt{\hat v_i + \varepsilon}` and the normalised Gramian
    :math:`\hat G = G \odot s s^\top`. The update :math:`d` solves

    .. math::
        \min_d \tfrac12\|d - \hat g_0\|^2 \quad\text{s.t.}\quad
        \hat g_j^\top d \ge \tau_j \|\hat g_j\|^2 \ (j \ge 1),

    through its dual :math:`\min_{\mu \ge 0} \tfrac12\mu^\top \hat G_{11}\mu - b^\top\mu`,
    :math:`b = \tau \odot \operatorname{diag}\hat G_{11} - \hat G_{10}`
    (:func:`~jdoptim.solvers.pcd.pcd_dual_qp`, ``10 m`` fixed dual active-set steps, float64),
    so :math:`w = [1, \mu]`. The weights :math:`w \odot s` are rescaled so that the update has
    the norm :math:`\|g_0\|`; they are 0 when :math:`q_0 \le 0` or when the update vanishes
    (:math:`w^\top\hat G w \le 10\epsilon_{\text{dtype}} (\sum_i |w_i| \hat G_{ii}^{1/2})^2`,
    a threshold that depends on the input dtype, as in torchjd). Infeasible constraints give
    :math:`w = [1, 0, \dots]` (the update is :math:`g_0`); a non-finite input gives NaN and
    leaves the state untouched (with value checks off; by default it is refused).

    Stateful: :math:`v` and :math:`k` (float64, on the input's device) restart when ``m``
    changes and at :meth:`reset`. Not differentiable. Sync-free and
    ``torch.compile``-friendly (torchjd runs the QP on the CPU with host reads).

    :param tau: Required relative progress of each secondary objective: a float in
        :math:`[0, 1]`, or a vector of ``m - 1`` of them.
    :param beta: EMA rate in :math:`[0, 1)`.
    :param eps: :math:`\varepsilon \ge 0` under the square root.

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> PCDWeighting()(J @ J.T)
    tensor([1.8481, 1.0954])
    """

    differentiable = False
    state_buffers = ("_ema", "_count")
    tau = Param(_check_tau)
    beta = Param(in_unit_interval("beta", closed=False))
    eps = Param(_check_eps)

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__()
        self.tau = tau
        self.beta = beta
        self.eps = eps
        self.init_state()

    def reset(self) -> None:
        """Forget the EMA of the squared gradient norms."""
        self.clear_state()

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        device = stat.device
        f64 = torch.float64
        if isinstance(self.tau, Tensor):
            if self.tau.shape[0] != m - 1:
                raise ValueError(
                    "When `tau` is a vector, it must have one value per secondary objective. "
                    f"Found `tau.shape[0] = {self.tau.shape[0]}` for {m - 1} secondary "
                    "objectives."
                )
            tau = self.tau.to(dtype=f64, device=device)
        else:
            tau = torch.full((m - 1,), float(self.tau), dtype=f64, device=device)
        if self._ema is None or self._ema.shape[0] != m:
            self._ema = torch.zeros(m, dtype=f64, device=device)
            self._count = torch.zeros((), dtype=f64, device=device)
        elif self._ema.device != device:
            self._ema = self._ema.to(device)
            self._count = self._count.to(device)

        g = stat.to(f64)
        finite = torch.isfinite(g).all()
        q = g.diagonal()
        ema = self.beta * self._ema + (1 - self.beta) * q
        count = self._count + 1
        v_hat = ema / (1 - torch.pow(torch.tensor(self.beta, dtype=f64, device=device), count))
        root = torch.sqrt(v_hat + self.eps)
        scales = torch.where(root > 0, 1 / torch.where(root > 0, root, 1.0), 0.0)
        prec = 10 * torch.finfo(stat.dtype).eps
        normalised = g * scales.unsqueeze(0) * scales.unsqueeze(1)
        normalised = torch.where(finite, normalised, 0.0)  # keep the QP NaN-free

        w = torch.ones(m, dtype=f64, device=device)
        if m > 1:
            secondary = normalised[1:, 1:]
            b = tau * secondary.diagonal() - normalised[1:, 0]
            tiny = torch.finfo(f64).tiny
            atol = _QP_TOL * normalised.diagonal().amax().clamp(min=tiny)
            mu, infeasible = pcd_dual_qp(secondary, b, max(_QP_TOL, prec), atol, 10 * m)
            mu = torch.where(infeasible, 0.0, mu.clamp(min=0))
            w = torch.cat([w[:1], mu])
        d2 = w @ normalised @ w
        bound = (w.abs() * normalised.diagonal().clamp(min=0).sqrt()).sum() ** 2
        keep = (q[0] > 0) & (d2 > prec * bound)
        rescale = torch.sqrt(q[0].clamp(min=0) / torch.where(keep, d2, 1.0))
        weights = torch.where(keep, w * scales * rescale, 0.0)
        weights = torch.where(finite, weights, torch.nan)
        self._ema.copy_(torch.where(finite, ema, self._ema))
        self._count.copy_(torch.where(finite, count, self._count))
        return weights.to(stat.dtype)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(tau={self.tau!r}, beta={self.beta!r}, eps={self.eps!r})"


class PCD(GramianWeightedAggregator, Stateful):
    r"""Aggregator :math:`J \mapsto w^\top J` with the weights of :class:`PCDWeighting`
    (torchjd 0.18's ``PCD``). Row 0 of :math:`J` is the primary objective. Stateful, not
    differentiable.

    >>> import torch
    >>> PCD()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([-0.8200,  2.9434,  2.9434])
    """

    differentiable = False
    tau = Param(forward="gramian_weighting")
    beta = Param(forward="gramian_weighting")
    eps = Param(forward="gramian_weighting")

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(tau={self.tau!r}, beta={self.beta!r}, eps={self.eps!r})"
