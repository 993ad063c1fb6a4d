"""Gramian helpers: computing ``J J^T`` and the trace normalisation used by the QP methods."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_gramian(matrix: Tensor) -> Tensor:
    r"""Return the Gramian :math:`G = J J^\top` of a matrix ``J`` (one row per objective).

    >>> import torch
    >>> compute_gramian(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([[ 18., -22.],
            [-22.,  38.]])
    """
    return matrix @ matrix.mT


def normalize(gramian: Tensor, eps: float) -> Tensor:
    r"""Divide :math:`G` by its trace :math:`\tau = \|J\|_F^2`, or return zeros when
    :math:`\tau < \varepsilon`. Sync-free: the choice is a ``torch.where``.

    >>> import torch
    >>> normalize(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), eps=1e-4)
    tensor([[0.5000, 0.2500],
            [0.2500, 0.5000]])
    """
    trace = gramian.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
    safe = torch.where(trace >= eps, trace, torch.ones_like(trace))
    return torch.where(trace >= eps, gramian / safe, torch.zeros_like(gramian))


def regularize(gramian: Tensor, eps: float) -> Tensor:
    r"""Return :math:`G + \varepsilon I`.

    >>> import torch
    >>> regularize(torch.zeros(2, 2), eps=0.5)
    tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]])
    """
    eye = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    return gramian + eps * eye
