r"""FairGrad's equation :math:`G x = x^{-1/\alpha}`, solved by a fixed number of Newton steps."""

from __future__ import annotations

import torch
from torch import Tensor

from ._loop import fixed_loop

DEFAULT_ITERATIONS = 20
_MAX_LOG_STEP = 2.0


def fairgrad_root(gramian: Tensor, alpha: float, n_iters: int = DEFAULT_ITERATIONS) -> Tensor:
    r"""Return the positive root :math:`x` of :math:`(G x)_i = x_i^{-1/\alpha}`, :math:`\alpha > 0`.

    The system is the stationarity condition of the strictly convex problem
    :math:`\min_{x > 0} \tfrac12 x^\top G x + \sum_i \varphi(x_i)` (:math:`\varphi = -\log` for
    :math:`\alpha = 1`, else :math:`-x^p/p` with :math:`p = 1 - 1/\alpha`), so a positive root
    is unique when it exists (iff no non-zero :math:`v \ge 0` has :math:`Gv = 0`).

    Newton's method in log coordinates :math:`x = e^y`: with :math:`r = G e^y - e^{-y/\alpha}`,
    each step solves the symmetric system

    .. math::
        \big(\operatorname{diag}(x)\, G \operatorname{diag}(x)
        + \operatorname{diag}(x^{1 - 1/\alpha}/\alpha)\big)\,\Delta y = -x \odot r

    with :func:`torch.linalg.solve_ex` (no host check), clamps :math:`\Delta y` to
    :math:`[-2, 2]` (and a non-finite step to 0) and adds it. The start is the root of the
    averaged scalar problem, :math:`x_i = (\operatorname{tr}G/m)^{-\alpha/(1+\alpha)}`, or
    :math:`1/m` when :math:`\operatorname{tr} G = 0`. ``n_iters`` fixed steps in float64; the
    result is cast back to ``gramian``'s dtype. Where no positive root exists the iterates stay
    finite but are meaningless. Sync-free and ``torch.compile``-friendly.

    >>> import torch
    >>> fairgrad_root(torch.tensor([[2.0, 0.0], [0.0, 8.0]]), alpha=1.0)
    tensor([0.7071, 0.3536])
    """
    dtype = gramian.dtype
    g = gramian.to(torch.float64)
    m = g.shape[0]
    inv_alpha = 1.0 / alpha
    trace = g.diagonal().sum()
    mean_diag = torch.where(trace > 0, trace / m, 1.0)
    start = torch.where(
        trace > 0, mean_diag.pow(-alpha / (1.0 + alpha)), torch.full_like(trace, 1.0 / m)
    )
    y0 = torch.log(start).expand(m).clone()

    def newton(y: Tensor) -> tuple[Tensor]:
        x = torch.exp(y)
        residual = g @ x - torch.exp(-y * inv_alpha)
        hessian = x.unsqueeze(1) * g * x.unsqueeze(0) + torch.diag(x.pow(1 - inv_alpha) * inv_alpha)
        step = torch.linalg.solve_ex(hessian, -(x * residual))[0]
        step = torch.where(torch.isfinite(step), step, 0.0).clamp(-_MAX_LOG_STEP, _MAX_LOG_STEP)
        return (y + step,)

    (y,) = fixed_loop(n_iters, newton, (y0,))
    return torch.exp(y).to(dtype)
