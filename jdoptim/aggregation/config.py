r"""ConFIG (Liu et al., 2024): a conflict-free direction from the pseudo-inverse of the unit
gradients, scaled by the sum of the gradients' projections onto it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..solvers.eigh import symmetric_eig
from ._base import Aggregator
from ._format import pref_vector_to_str_suffix
from ._pref import pref_vector_param
from .sum import SumWeighting

_NORMALIZE_EPS = 1e-12
_NOISE_FACTOR = 4.0


def unit_rows_pinv_apply(units: Tensor, p: Tensor, rtol: float) -> Tensor:
    r"""Return :math:`\hat U^+ p` for a float64 ``[m, n]`` matrix :math:`\hat U` (ConFIG's unit
    rows) through the :math:`m \times m` Gram matrix: :math:`\hat U^+ p = \hat U^\top
    (\hat U \hat U^\top)^+ p`.

    :func:`torch.linalg.pinv` drops the singular values :math:`\sigma_i \le \text{rtol}\,
    \sigma_{\max}` of :math:`\hat U`; the eigenvalues of :math:`K = \hat U \hat U^\top` are
    :math:`\sigma_i^2`, so :math:`\lambda_i \le \text{rtol}^2 \lambda_{\max}` are dropped here.
    :math:`K` itself carries rounding errors of about :math:`m \sqrt{n}\,\varepsilon_{64}
    \lambda_{\max}`, so eigenvalues below that noise floor (times a margin of 4) are dropped too:
    with a float64 :math:`\hat U`, singular values under about :math:`10^{-7} \sigma_{\max}` are
    treated as zero, where ``pinv`` keeps down to :math:`\max(m, n)\,\varepsilon_{64}
    \sigma_{\max}` (the Gram route cannot resolve them).

    >>> import torch
    >>> u = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    >>> unit_rows_pinv_apply(u, torch.ones(2, dtype=torch.float64), rtol=1e-6).round(decimals=12)
    tensor([1., 0.], dtype=torch.float64)
    """
    m, n = units.shape
    vals, vecs = symmetric_eig(units @ units.mT)
    noise = _NOISE_FACTOR * (m * math.sqrt(n) + m) * torch.finfo(torch.float64).eps
    keep = vals > max(rtol**2, noise) * vals.amax()
    inv = torch.where(keep, 1 / torch.where(keep, vals, 1.0), 0.0)
    return units.mT @ (vecs @ (inv * (vecs.mT @ p)))


class ConFIG(Aggregator):
    r"""ConFIG aggregator (no weighting form).

    With :math:`\hat U` the matrix of unit rows :math:`g_i / \|g_i\|` (zero rows stay zero) and
    :math:`p` the preference weights (``pref_vector``, default :math:`\mathbb{1}`):

    .. math::

        b = \hat U^+ p, \qquad u = \frac{b}{\max(\|b\|, 10^{-12})}, \qquad
        \mathcal{A}(J) = \Big(\sum_i \langle g_i, u \rangle\Big) u.

    :math:`\hat U^+` is :func:`torch.linalg.pinv` with its default tolerance
    (:math:`\max(m, n)\,\varepsilon` of ``J``'s dtype), computed without host synchronisation
    via the Gram matrix (:func:`unit_rows_pinv_apply`), in float64; the result is cast back to
    ``J``'s dtype. Not differentiable (runs under :func:`torch.no_grad`).

    Args:
        pref_vector: preference weights (1-D), or ``None`` for ones.

    >>> import torch
    >>> ConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1588, 2.0706, 2.0706])
    """

    differentiable = False
    pref_vector = pref_vector_param(SumWeighting)

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self.pref_vector = pref_vector

    def forward(self, matrix: Tensor, /) -> Tensor:
        m, n = matrix.shape
        p = self.weighting(matrix).to(torch.float64)
        jac = matrix.to(torch.float64)
        units = torch.nan_to_num(jac / jac.norm(dim=1, keepdim=True), 0.0)
        b = unit_rows_pinv_apply(units, p, rtol=max(m, n) * torch.finfo(matrix.dtype).eps)
        u = b / b.norm().clamp(min=_NORMALIZE_EPS)
        return ((jac.sum(0) @ u) * u).to(matrix.dtype)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(pref_vector={self.pref_vector!r})"

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_to_str_suffix(self.pref_vector)}"
