r"""MGDA: the minimum-norm point of the convex hull of the gradients, by Frank–Wolfe."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.solvers._loop import bounded_loop

from ._base import GramianWeightedAggregator, Weighting


def _check_epsilon(epsilon: float) -> float:
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, but got {epsilon}.")
    return epsilon


def _check_max_iters(max_iters: int) -> int:
    # bool is an int subclass, but ``True`` iterations make no sense.
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters <= 0:
        raise ValueError(f"max_iters must be a positive integer, but got {max_iters}.")
    return max_iters


def frank_wolfe_min_norm(gramian: Tensor, epsilon: float, max_iters: int) -> Tensor:
    r"""Frank–Wolfe iterations for :math:`\min_{\alpha \in \Delta_m} \alpha^\top G \alpha`.

    Starting from :math:`\alpha = \mathbb{1}/m`, each iteration picks the vertex
    :math:`t = \arg\min_i (G\alpha)_i` (first index on ties), computes
    :math:`a = \alpha^\top G e_t`, :math:`b = \alpha^\top G \alpha`, :math:`c = G_{tt}`, the exact
    line-search step

    .. math::
        \gamma = \begin{cases} 1 & c \le a \\ 0 & b \le a \\
        \frac{b - a}{b + c - 2a} & \text{otherwise} \end{cases}

    and sets :math:`\alpha \leftarrow (1 - \gamma)\alpha + \gamma e_t` (:math:`\gamma` clamped
    to :math:`[0, 1]` against rounding, so that :math:`\alpha \ge 0` holds exactly). The first
    iteration with :math:`\gamma < \varepsilon` is applied and then freezes :math:`\alpha` (a
    ``done`` flag read through ``torch.where``). On an accelerator the loop therefore always
    runs ``max_iters`` iterations and never syncs; on the CPU, where reading the flag is free, it
    stops at the flag (:func:`~jdoptim.solvers._loop.bounded_loop`), with the same result.

    >>> import torch
    >>> frank_wolfe_min_norm(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]), 1e-3, 100)
    tensor([0.6000, 0.4000])
    """
    m = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    indices = torch.arange(m, device=device)

    def body(alpha: Tensor, done: Tensor) -> tuple[Tensor, Tensor]:
        g_alpha = gramian @ alpha
        t = torch.argmin(g_alpha, dim=0, keepdim=True)
        a = g_alpha.gather(0, t)
        b = alpha @ g_alpha
        # The diagonal is read inside the body: a view made outside would alias G among the
        # loop's inputs, and a copy made outside gets a wrong compiled gradient (torch 2.13).
        c = gramian.diagonal().gather(0, t)
        vertex = c <= a
        stay = b <= a
        # Guarded denominator: the discarded branches must not create NaN gradients.
        denominator = torch.where(vertex | stay, 1.0, b + c - 2 * a)
        gamma = torch.where(vertex, 1.0, torch.where(stay, 0.0, (b - a) / denominator))
        # In exact arithmetic gamma is in [0, 1]; rounding can push it just outside, which would
        # make a weight negative. Clamped, every update is a convex combination: alpha >= 0.
        gamma = gamma.clamp(0.0, 1.0)
        updated = (1 - gamma) * alpha + gamma * (indices == t).to(dtype)
        return torch.where(done, alpha, updated), done | (gamma < epsilon).squeeze(0)

    alpha0 = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
    if gramian.requires_grad and torch.is_grad_enabled():
        # Under torch.compile (torch 2.13), while_loop's backward silently drops the gradient
        # flowing into a carry whose initial value does not require grad. Tie alpha0 to G with
        # an exact zero so that the compiled gradient equals the eager one.
        alpha0 = alpha0 + 0 * gramian[0]
    done0 = torch.zeros((), dtype=torch.bool, device=device)
    alpha, _ = bounded_loop(max_iters, body, (alpha0, done0), done_index=1)
    # Rounding makes the sum drift from 1 by a few ulps over the iterations: renormalise (the
    # weights stay >= 0; in exact arithmetic the sum is 1 and this changes nothing).
    return alpha / alpha.sum()


class MGDAWeighting(Weighting):
    r"""Weights of the minimum-norm point of the convex hull of the gradients (Sener & Koltun,
    2018):

    .. math::
        w \approx \arg\min_{\alpha \in \Delta_m} \alpha^\top G \alpha,
        \qquad \Delta_m = \{\alpha \ge 0, \ \mathbb{1}^\top \alpha = 1\},

    found by at most ``max_iters`` Frank–Wolfe iterations (see :func:`frank_wolfe_min_norm`),
    stopping at the first step :math:`\gamma <` ``epsilon``. The iterations run in float64 and
    the weights are cast back to the Gramian's dtype. The weights are on the simplex: exactly
    non-negative, and summing to 1 up to rounding.

    :param epsilon: Positive step size below which the iterations stop.
    :param max_iters: Positive maximum number of iterations.

    >>> import torch
    >>> MGDAWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.6000, 0.4000])
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.max_iters = max_iters

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = _check_epsilon(value)

    @property
    def max_iters(self) -> int:
        return self._max_iters

    @max_iters.setter
    def max_iters(self, value: int) -> None:
        self._max_iters = _check_max_iters(value)

    def forward(self, stat: Tensor, /) -> Tensor:
        work = stat.to(torch.float64)
        return frank_wolfe_min_norm(work, self.epsilon, self.max_iters).to(stat.dtype)


class MGDA(GramianWeightedAggregator):
    r"""Aggregator :math:`J \mapsto w^\top J` with the MGDA weights :math:`w` of
    :class:`MGDAWeighting`: the (approximate) minimum-norm element of the convex hull of the rows
    of :math:`J`. Differentiable through the Frank–Wolfe iterations.

    :param epsilon: Positive step size below which the Frank–Wolfe iterations stop.
    :param max_iters: Positive maximum number of Frank–Wolfe iterations.

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> d = MGDA()(J)  # (0, 1, 1) up to rounding (the first entry cancels: 0.6 * -4 + 0.4 * 6)
    >>> torch.allclose(d, torch.tensor([0.0, 1.0, 1.0]), atol=1e-6)
    True
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon=epsilon, max_iters=max_iters))

    @property
    def epsilon(self) -> float:
        return self.gramian_weighting.epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self.gramian_weighting.epsilon = value

    @property
    def max_iters(self) -> int:
        return self.gramian_weighting.max_iters

    @max_iters.setter
    def max_iters(self, value: int) -> None:
        self.gramian_weighting.max_iters = value

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(epsilon={self.epsilon!r}, max_iters={self.max_iters!r})"
