"""Gramian helpers: computing ``J J^T``; the trace normalisation and the ridge live in
:mod:`jdoptim.solvers.normalization` (re-exported here)."""

from __future__ import annotations

from torch import Tensor

from ..solvers.normalization import check_norm_eps, normalize, regularize, trace_threshold

__all__ = [
    "check_norm_eps",
    "compute_gramian",
    "normalize",
    "regularize",
    "trace_threshold",
]


def compute_gramian(matrix: Tensor) -> Tensor:
    r"""Return the Gramian :math:`G = J J^\top` of a matrix ``J`` (one row per objective).

    >>> import torch
    >>> compute_gramian(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([[ 18., -22.],
            [-22.,  38.]])
    """
    return matrix @ matrix.mT
