r"""IMTL-G: weights that give every objective the same projection on the update.

The generalised IMTL-G (Liu et al., 2021, as generalised in the UPGrad paper to rank-deficient
Jacobians) solves :math:`G v = d` in the least-squares sense, with :math:`d_i = \|g_i\|` and
:math:`G = J J^\top`, and normalises :math:`v` to sum to one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.eigh import psd_pinv_apply
from ..solvers.normalization import normalize, trace_threshold
from ._base import GramianWeightedAggregator, Weighting

_SUM_EPS = 1e-12


class IMTLGWeighting(Weighting):
    r"""Weighting of :class:`IMTLG`, applied to the Gramian :math:`G`.

    .. math::

        G_n = G / \operatorname{tr}(G), \qquad
        d = \sqrt{\operatorname{diag}(G_n)}, \qquad v = G_n^+ d, \qquad
        w = \begin{cases} v / \mathbb{1}^\top v & \text{if } |\mathbb{1}^\top v| \ge 10^{-12} \\
        0 & \text{otherwise} \end{cases}

    :math:`G^+` is the pseudo-inverse with :func:`torch.linalg.pinv`'s default tolerance
    (eigenvalues :math:`|\lambda_i| \le m \varepsilon \max_j |\lambda_j|` are treated as zero,
    :math:`\varepsilon` the machine epsilon of ``G``'s dtype). Everything is computed from
    :math:`G / \operatorname{tr}(G)` (the weights are invariant to the scale of :math:`G`, and
    then exactly so for powers of two; :math:`G = 0` gives zero weights). It is computed without
    host synchronisation by :func:`jdoptim.solvers.eigh.psd_pinv_apply`, in float64; the weights
    are cast back to ``G``'s dtype. Not differentiable (runs under :func:`torch.no_grad`).

    >>> import torch
    >>> IMTLGWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.5923, 0.4077])
    """

    differentiable = False

    def forward(self, stat: Tensor, /) -> Tensor:
        # Trace-normalised first: scaling G by a power of two leaves G / tr(G) bitwise unchanged.
        gramian = normalize(stat.to(torch.float64), trace_threshold(stat.dtype, None))
        norms = gramian.diagonal().sqrt()
        v = psd_pinv_apply(gramian, norms, rtol=stat.shape[0] * torch.finfo(stat.dtype).eps)
        total = v.sum()
        ok = total.abs() >= _SUM_EPS
        w = torch.where(ok, v / torch.where(ok, total, 1.0), 0.0)
        return w.to(stat.dtype)


class IMTLG(GramianWeightedAggregator):
    r"""Aggregator :math:`J \mapsto w^\top J` with the :class:`IMTLGWeighting` of
    :math:`J J^\top`: when :math:`J` has full row rank, the update :math:`u = J^\top w` has the
    same projection :math:`\langle g_i / \|g_i\|, u \rangle` onto every unit gradient.

    >>> import torch
    >>> IMTLG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0767, 1.0000, 1.0000])
    """

    differentiable = False

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
