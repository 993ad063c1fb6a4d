r"""Aligned-MTL (Senushkin et al., 2023): align the gradients by whitening the Gramian.

The weights :math:`B p` make :math:`J^\top B` have orthogonal rows of equal norm on the range of
:math:`J` (condition number one), rescaled by a scalar chosen from the kept eigenvalues.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..solvers.eigh import symmetric_eig
from ._base import GramianWeightedAggregator, Param, Weighting
from ._format import pref_vector_to_str_suffix
from ._pref import pref_vector_param
from .mean import MeanWeighting

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = ("min", "median", "rmse")


def _check_scale_mode(scale_mode: object) -> object:
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"Invalid scale_mode={scale_mode!r}. Expected 'min', 'median', or 'rmse'.")
    return scale_mode


def _scale(vals: Tensor, keep: Tensor, rank: Tensor, scale_mode: str) -> Tensor:
    """The scale :math:`s` from the kept (largest ``rank``) of the ascending eigenvalues."""
    m = vals.shape[-1]
    if scale_mode == "min":
        s = torch.where(keep, vals, torch.inf).amin(-1)
    elif scale_mode == "median":  # lower median of the kept values, as torch.median
        idx = (m - rank + torch.div(rank - 1, 2, rounding_mode="floor")).clamp(0, m - 1)
        s = vals.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    else:  # "rmse": the mean of the kept eigenvalues
        s = torch.where(keep, vals, 0.0).sum(-1) / rank.clamp(min=1)
    return torch.where(rank > 0, s, 1.0)


class AlignedMTLWeighting(Weighting):
    r"""Weighting of :class:`AlignedMTL`, applied to the Gramian :math:`G`.

    With :math:`G = V \operatorname{diag}(\lambda) V^\top` (ascending :math:`\lambda`), the
    tolerance :math:`\text{tol} = m \varepsilon \max_i \lambda_i` (:math:`\varepsilon` the
    machine epsilon of ``G``'s dtype) and the kept set :math:`K = \{i : \lambda_i > \text{tol}\}`:

    .. math::

        B = \sqrt{s}\, V_K \operatorname{diag}(\lambda_K^{-1/2}) V_K^\top, \qquad w = B p,

    where :math:`p` is the preference weighting's output (``pref_vector``, default
    :math:`\tfrac{1}{m}\mathbb{1}`) and :math:`s` is the smallest kept eigenvalue
    (``scale_mode="min"``), their lower median (``"median"``) or their mean (``"rmse"``). When
    no eigenvalue is kept, :math:`B = I`. The eigendecomposition is
    :func:`jdoptim.solvers.eigh.symmetric_eig` (sync-free, float64); the weights are cast back
    to ``G``'s dtype. Differentiable (through the eigendecomposition's derivatives; the rank
    choice is piecewise constant).

    Args:
        pref_vector: preference weights :math:`p` (1-D), or ``None`` for the mean.
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``. Anything else raises
            ``ValueError`` here, at construction (torchjd raises the same message at call time).

    >>> import torch
    >>> AlignedMTLWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.5591, 0.4083])
    """

    pref_vector = pref_vector_param(MeanWeighting)
    scale_mode = Param(_check_scale_mode)

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        p = self.weighting(stat).to(torch.float64)
        vals, vecs = symmetric_eig(stat.to(torch.float64))
        tol = vals.amax() * m * torch.finfo(stat.dtype).eps
        keep = vals > tol
        rank = keep.sum()
        s = _scale(vals, keep, rank, self.scale_mode)
        inv_sqrt = torch.where(keep, torch.rsqrt(torch.where(keep, vals, 1.0)), 0.0)
        w = s.sqrt() * (vecs @ (inv_sqrt * (vecs.mT @ p)))
        return torch.where(rank > 0, w, p).to(stat.dtype)


class AlignedMTL(GramianWeightedAggregator):
    r"""Aggregator :math:`J \mapsto w^\top J` with the :class:`AlignedMTLWeighting` of
    :math:`J J^\top`.

    Args:
        pref_vector: preference weights (1-D), or ``None`` for the mean.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.

    >>> import torch
    >>> AlignedMTL()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2133, 0.9673, 0.9673])
    """

    pref_vector = Param(forward="gramian_weighting")
    scale_mode = Param(forward="gramian_weighting")

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode=scale_mode))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(pref_vector={self.pref_vector!r}, "
            f"scale_mode={self.scale_mode!r})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_to_str_suffix(self.pref_vector)}"
