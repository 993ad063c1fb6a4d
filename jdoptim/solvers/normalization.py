r"""Trace normalisation and ridge of a Gramian, shared by the solvers and the weightings.

Dividing :math:`G` by its trace :math:`\tau` makes every weighting built on
:math:`G / \tau` invariant to the scale of the gradients. Multiplying :math:`G` by a power of two
(what a gradient scaler does) changes neither the mantissas of :math:`G` nor of :math:`\tau`, so
:math:`G / \tau` is then *bitwise* unchanged, as long as nothing over- or underflows.

The only exception is a Gramian too small to normalise. With ``eps=None`` (the default of
jdoptim's weightings) that is a trace below the smallest *normal* number of the dtype
(:attr:`torch.finfo.tiny`: 1.2e-38 in float32, 2.2e-308 in float64), i.e. essentially
:math:`G = 0`, the one input for which no direction is preferred; the threshold does not depend
on the gradients' scale. A float ``eps`` keeps torchjd's absolute threshold: below
:math:`\tau < \varepsilon` the normalised Gramian is zero (e.g. UPGrad then returns the
preference weights), which depends on the scale.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_norm_eps(norm_eps: float | None) -> None:
    """Raise ``ValueError`` unless ``norm_eps`` is ``None`` or a non-negative number."""
    if norm_eps is not None and norm_eps < 0:
        raise ValueError(f"norm_eps must be non-negative, but got {norm_eps}.")


def trace_threshold(dtype: torch.dtype, eps: float | None) -> float:
    """The trace below which :func:`normalize` returns zeros: ``eps``, or for ``None`` the
    smallest normal number of ``dtype``.

    >>> import torch
    >>> trace_threshold(torch.float32, None), trace_threshold(torch.float32, 1e-4)
    (1.1754943508222875e-38, 0.0001)
    """
    return torch.finfo(dtype).tiny if eps is None else eps


def normalize(gramian: Tensor, eps: float | None = None) -> Tensor:
    r"""Divide :math:`G` by its trace :math:`\tau = \|J\|_F^2`, or return zeros when
    :math:`\tau` is below :func:`trace_threshold` (``eps``, or the dtype's smallest normal for
    ``None``). Sync-free: the choice is a ``torch.where``.

    >>> import torch
    >>> normalize(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    tensor([[0.5000, 0.2500],
            [0.2500, 0.5000]])
    >>> normalize(torch.tensor([[2.0, 1.0], [1.0, 2.0]]) * 2.0**-100)
    tensor([[0.5000, 0.2500],
            [0.2500, 0.5000]])
    """
    threshold = trace_threshold(gramian.dtype, eps)
    trace = gramian.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
    keep = trace >= threshold
    safe = torch.where(keep, trace, 1.0)
    return torch.where(keep, gramian / safe, 0.0)


def regularize(gramian: Tensor, eps: float) -> Tensor:
    r"""Return :math:`G + \varepsilon I`.

    >>> import torch
    >>> regularize(torch.zeros(2, 2), eps=0.5)
    tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]])
    """
    out = gramian.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(eps)  # two operations where `G + eps * I` takes three
    return out


def normalized_ridge(gramian: Tensor, eps: float | None, reg_eps: float) -> Tensor:
    r""":math:`\operatorname{regularize}(\operatorname{normalize}(G, \varepsilon),
    \varepsilon_r)` of a 2-D ``gramian``, bit for bit, in a new tensor. On the CPU outside
    ``torch.compile`` the trace is read once (no device to wait for) and the result takes three
    operations instead of eleven (15-20 us less a call at m = 64); elsewhere the sync-free
    :func:`normalize` and :func:`regularize`.

    >>> import torch
    >>> normalized_ridge(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), None, 0.5)
    tensor([[1.0000, 0.2500],
            [0.2500, 1.0000]])
    """
    if gramian.device.type != "cpu" or gramian.ndim != 2 or torch.compiler.is_compiling():
        return regularize(normalize(gramian, eps), reg_eps)
    trace = gramian.diagonal().sum()  # the reduction normalize makes (same bits)
    if bool(trace >= trace_threshold(gramian.dtype, eps)):
        out = gramian / trace
    else:
        out = torch.zeros_like(gramian)
    out.diagonal().add_(reg_eps)
    return out
