r"""SDMGrad (Xiao et al., NeurIPS 2023): stochastic direction-oriented multi-objective gradient
descent, weights from the cross-batch product :math:`A = J_1 J_2^\top`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers._loop import fixed_loop
from ..solvers.simplex_projection import project_onto_simplex
from ._base import Param, Stateful, Weighting
from ._pref import check_pref_vector
from ._state import LazyState
from ._validate import in_unit_interval, non_negative, positive, positive_int


class SDMGradWeighting(LazyState, Weighting, Stateful):
    r"""SDMGrad weights (torchjd 0.18's ``SDMGradWeighting``).

    With :math:`\tilde w` = ``pref_vector`` (not normalised) or :math:`\mathbb{1}/m`,
    :math:`s = \operatorname{mean}_i \sqrt{\max(A_{ii}, 0)}` and :math:`a = A/(s^2 + 10^{-8})`,
    each call runs ``n_iter`` projected momentum steps on the inner simplex variable :math:`w`:

    .. math::
        g = a(w + \lambda\tilde w), \quad v \leftarrow \beta v + g \ (v = g \text{ first}), \quad
        w \leftarrow \Pi_\Delta(w - \eta v),

    and returns :math:`(w + \lambda \tilde w)/(1 + \lambda)`. :math:`w` (uniform at the start)
    is kept across calls; the velocity is not. :math:`\Pi_\Delta` is
    :func:`~jdoptim.solvers.simplex_projection.project_onto_simplex` (torchjd's rule, including
    its all-zero result on huge entries).

    Stateful: :math:`w` restarts silently when the number of objectives, the dtype or the device
    changes, and at :meth:`reset`. Not differentiable. Sync-free and ``torch.compile``-friendly
    (torchjd syncs :math:`m - 1` times per projection).

    :param lr: Step size :math:`\eta > 0`.
    :param momentum: :math:`\beta \in [0, 1)`.
    :param n_iter: Number of inner steps per call, ``>= 1``.
    :param lambda_: Weight :math:`\lambda \ge 0` of the preference direction.
    :param pref_vector: :math:`\tilde w` (1-D, length ``m``), or ``None`` for uniform.

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> SDMGradWeighting()(J @ J.T)
    tensor([0.1154, 0.8846])
    """

    input_kind = "matrix"
    differentiable = False
    state_buffers = ("_w",)
    lr = Param(positive("lr"))
    momentum = Param(in_unit_interval("momentum", closed=False))
    n_iter = Param(positive_int("n_iter"))
    lambda_ = Param(non_negative("lambda_"))
    pref_vector = Param(check_pref_vector)

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.n_iter = n_iter
        self.lambda_ = lambda_
        self.pref_vector = pref_vector
        self.init_state()

    def reset(self) -> None:
        """Restart from uniform inner weights at the next call."""
        self.clear_state()

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        w = self._w
        if w is None or w.shape[0] != m or w.dtype != stat.dtype or w.device != stat.device:
            w = torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
            self._w = w
        if self.pref_vector is None:
            pref = torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
        elif self.pref_vector.shape[0] != m:
            raise ValueError(
                "The length of `pref_vector` must match the number of rows of the input matrix. "
                f"Found len(pref_vector)={self.pref_vector.shape[0]} and m={m}."
            )
        else:
            pref = self.pref_vector.to(dtype=stat.dtype, device=stat.device)
        scale = stat.diagonal().clamp(min=0).sqrt().mean()
        a = stat / (scale**2 + 1e-8)
        shift = self.lambda_ * pref

        def step(w: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            v = self.momentum * v + a @ (w + shift)
            return project_onto_simplex(w - self.lr * v), v

        # The first step has v = g: start from v = 0.
        new, _ = fixed_loop(self.n_iter, step, (w, torch.zeros_like(w)))
        w.copy_(new)
        return (new + shift) / (1 + self.lambda_)

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr!r}, momentum={self.momentum!r}, n_iter={self.n_iter!r}, "
            f"lambda_={self.lambda_!r}, pref_vector={self.pref_vector!r}"
        )

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"
