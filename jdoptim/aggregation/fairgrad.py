r"""FairGrad (Ban & Ji, ICML 2024): :math:`\alpha`-fair task weights from the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.fairgrad import DEFAULT_ITERATIONS, fairgrad_root
from ._base import GramianWeightedAggregator, Param, Weighting


class FairGradWeighting(Weighting):
    r"""FairGrad weights (torchjd 0.18's ``FairGradWeighting``): the positive root of

    .. math::
        (G w)_i = w_i^{-1/\alpha} \quad \text{for all } i,

    the stationarity condition of :math:`\alpha`-fair utility maximisation over the update
    :math:`d = J^\top w`. ``alpha = 0`` gives :math:`\mathbb{1}/m`.

    torchjd solves the equation with scipy's ``least_squares`` (CPU, numpy, host syncs); this
    solves it exactly with :func:`~jdoptim.solvers.fairgrad.fairgrad_root`, a fixed number of
    Newton steps in float64 (pure torch, sync-free, ``torch.compile``-friendly). On well-posed
    inputs both agree to ~1e-7; where no positive root exists (e.g. a zero or a pair of opposite
    gradients, or :math:`0` in the convex hull of the gradients) torchjd returns wherever scipy
    stops and jdoptim returns a finite but equally meaningless iterate. Non-finite input raises
    ``ValueError`` where value checks run (:mod:`jdoptim.aggregation._checks`). Stateless, not
    differentiable.

    :param alpha: Fairness exponent (not checked; ``0`` is the mean, ``1`` proportional
        fairness, ``→ ∞`` max-min fairness).
    :param max_iters: Newton steps (default :data:`~jdoptim.solvers.fairgrad.DEFAULT_ITERATIONS`
        = 20; torchjd's function-evaluation budget has no numeric equivalent here).

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> FairGradWeighting(alpha=1.0)(J @ J.T)
    tensor([0.5915, 0.4071])
    """

    differentiable = False
    alpha = Param()
    max_iters = Param()

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__()
        self.alpha = alpha
        self.max_iters = max_iters

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if self.alpha == 0:
            return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
        n_iters = DEFAULT_ITERATIONS if self.max_iters is None else self.max_iters
        return fairgrad_root(stat, float(self.alpha), n_iters)


class FairGrad(GramianWeightedAggregator):
    r"""Aggregator :math:`J \mapsto w^\top J` with the weights of :class:`FairGradWeighting`
    (torchjd 0.18's ``FairGrad``). Stateless, not differentiable.

    >>> import torch
    >>> FairGrad(alpha=1.0)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0766, 0.9985, 0.9985])
    """

    differentiable = False
    alpha = Param(forward="gramian_weighting")
    max_iters = Param(forward="gramian_weighting")

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__(FairGradWeighting(alpha, max_iters))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(alpha={self.alpha!r}, max_iters={self.max_iters!r})"

    def __str__(self) -> str:
        return f"{self.alpha}-{self.__class__.__name__}"
