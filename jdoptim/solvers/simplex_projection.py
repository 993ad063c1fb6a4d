r"""Euclidean projection onto the probability simplex, sort-based and sync-free."""

from __future__ import annotations

import torch
from torch import Tensor


def project_onto_simplex(y: Tensor) -> Tensor:
    r"""Return :math:`\Pi_\Delta(y) = \max(y - \theta, 0)`, the projection of a vector onto
    :math:`\Delta_m = \{x \ge 0, \mathbb{1}^\top x = 1\}`.

    With :math:`u` the entries of :math:`y` sorted decreasingly and
    :math:`t_k = (\sum_{i \le k} u_i - 1)/k` (:math:`k = 1..m`), :math:`\theta = t_{L+1}` for the
    first :math:`L` with :math:`t_{L+1} > u_{L+2}`, and :math:`(\sum_i y_i - 1)/m` if there is
    none. This is the rule of torchjd 0.18 (MoDo, SDMGrad) evaluated with ``torch.where``
    instead of a Python loop, so it keeps torchjd's behaviour on huge entries: when
    :math:`u_1 - 1` rounds to :math:`u_1`, :math:`\theta = u_1` and the result is all zeros.
    A NaN entry gives a NaN result. No host synchronisation; ``torch.compile``-friendly.

    >>> import torch
    >>> project_onto_simplex(torch.tensor([0.5, 2.0, -1.0]))
    tensor([0., 1., 0.])
    >>> project_onto_simplex(torch.tensor([0.3, 0.3]))
    tensor([0.5000, 0.5000])
    """
    m = y.shape[-1]
    u = torch.sort(y, descending=True).values
    k = torch.arange(1, m + 1, dtype=y.dtype, device=y.device)
    t = (torch.cumsum(u, dim=0) - 1) / k
    crossed = t[:-1] > u[1:]
    leading = (torch.cumsum(crossed.to(torch.int64), dim=0) == 0).sum()
    at = t.gather(0, leading.clamp(max=m - 1).unsqueeze(0)).squeeze(0)
    theta = torch.where(leading < m - 1, at, (y.sum() - 1) / m)
    return torch.clamp(y - theta, min=0)
