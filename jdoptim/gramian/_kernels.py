r"""Gram-block accumulation :math:`A \leftarrow A + B B^\top`, with a hook for device kernels.

The Jacobian engine adds one block :math:`B = J_p \in \mathbb{R}^{M \times n_p}` (the Jacobian
of the ``M`` losses with respect to one parameter ``p``, flattened) at a time into an
``M x M`` accumulator kept in float32 or wider, whatever the dtype of ``B`` (bf16/fp16
Jacobians are upcast block by block, so only one block is ever held twice).

A faster kernel for some device type (e.g. a Triton kernel on CUDA that reads bf16 and
accumulates in float32 without the upcast copy) plugs in with :func:`register_gram_kernel`;
it must be traceable by ``torch.compile`` (a ``torch.library.triton_op`` or a custom op with a
fake implementation) so the JD step stays one graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GramKernel = Callable[[Tensor, Tensor], Tensor]
"""``kernel(acc, block) -> acc + block @ block.T`` (``acc`` is ``[M, M]``, ``block`` ``[M, k]``)."""

_KERNELS: dict[str, GramKernel] = {}

LinearGramKernel = Callable[[Tensor, Tensor, bool], Tensor]
"""``kernel(A, D, bias) -> [B, K, B, K]`` per-sample Gramian of a linear layer (see
:class:`jdoptim.gramian._layers.LinearFactor`: ``A`` is ``[G, B, T, d]``, ``D``
``[G, B, K, T, p]``)."""

_LINEAR_KERNELS: dict[str, LinearGramKernel] = {}


def register_gram_kernel(device_type: str, kernel: GramKernel | None) -> None:
    """Use ``kernel`` for Gram accumulation on ``device_type`` (``None`` restores torch).

    >>> register_gram_kernel("cuda", None)
    """
    if kernel is None:
        _KERNELS.pop(device_type, None)
    else:
        _KERNELS[device_type] = kernel


def register_linear_gram_kernel(device_type: str, kernel: LinearGramKernel | None) -> None:
    """Use ``kernel`` for the layer-wise engine's linear-layer Gramians on ``device_type``
    (``None`` restores torch). Same tracing requirement as :func:`register_gram_kernel`.

    >>> register_linear_gram_kernel("cuda", None)
    """
    if kernel is None:
        _LINEAR_KERNELS.pop(device_type, None)
    else:
        _LINEAR_KERNELS[device_type] = kernel


def linear_gram_kernel(device_type: str) -> LinearGramKernel | None:
    """The kernel registered with :func:`register_linear_gram_kernel`, if any.

    >>> linear_gram_kernel("meta") is None
    True
    """
    return _LINEAR_KERNELS.get(device_type)


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The Gramian dtype for Jacobian blocks of ``dtypes``: their promotion with float32.

    >>> accumulation_dtype(torch.bfloat16, torch.float16)
    torch.float32
    >>> accumulation_dtype(torch.float32, torch.float64)
    torch.float64
    """
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def accumulate_gram(acc: Tensor, block: Tensor) -> Tensor:
    r"""Return ``acc + block @ block.T`` computed in ``acc.dtype``.

    >>> import torch
    >>> b = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.bfloat16)
    >>> accumulate_gram(torch.zeros(2, 2), b)
    tensor([[5., 2.],
            [2., 1.]])
    """
    kernel = _KERNELS.get(block.device.type)
    if kernel is not None:
        return kernel(acc, block)
    b = block.to(acc.dtype)
    return torch.addmm(acc, b, b.mT)
