r"""Triton kernel for Gram-block accumulation :math:`G \leftarrow G + J_p J_p^\top`.

For a Jacobian block :math:`J_p \in \mathbb{R}^{M \times n}` (float32, float16 or bfloat16)
and a float32 accumulator :math:`G \in \mathbb{R}^{M \times M}`, the kernel tiles the rows into
blocks :math:`I_1, \dots, I_{n_b}` of ``BLOCK_M`` rows and computes only the tiles on or above
the diagonal,

.. math:: P_{ij} = J_{I_i} J_{I_j}^\top = \sum_{k} J_{I_i, K_k} J_{I_j, K_k}^\top,
    \qquad i \le j,

reading :math:`J` in its own dtype and accumulating in float32, then writes :math:`P_{ij}` and
its mirror :math:`P_{ij}^\top` at :math:`(j, i)`; diagonal tiles are symmetrised, so the result
is exactly symmetric when :math:`G` is. ``M`` need not be a multiple of the block size (masked
loads and stores). The columns are split into ``S`` contiguous chunks handled by different
programs (split-K: a Jacobian has few rows and many columns, so the tiles alone would not fill
a GPU); the ``S`` partial Gramians are summed by one torch reduction, which is deterministic
(no atomics).

On CUDA it is a ``torch.library.triton_op``, so ``torch.compile`` traces it into the graph.
Anywhere else (CPU without ``TRITON_INTERPRET=1``, float64, no Triton) :func:`gram_accumulate`
computes the same thing with ``torch.addmm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import HAS_TRITON, KERNEL_DTYPES, ieee_fp32, launchable, upcast_bf16

__all__ = ["gram_accumulate", "gram_accumulate_reference"]


def gram_accumulate_reference(acc: Tensor, block: Tensor) -> Tensor:
    r"""``acc + block @ block.T`` with ``block`` upcast to ``acc.dtype`` (the torch path).

    >>> import torch
    >>> gram_accumulate_reference(torch.eye(2), torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    tensor([[3., 2.],
            [2., 5.]])
    """
    b = block.to(acc.dtype)
    return torch.addmm(acc, b, b.mT)


def _check(acc: Tensor, block: Tensor) -> None:
    # Validation of static shapes only (no tensor values are read).
    if block.ndim != 2:
        raise ValueError(f"`block` should be a matrix [M, n], got shape {tuple(block.shape)}.")
    m = block.shape[0]
    if acc.shape != (m, m):
        raise ValueError(
            f"`acc` should have shape {(m, m)} to match `block` {tuple(block.shape)}, got "
            f"{tuple(acc.shape)}."
        )


def _use_kernel(acc: Tensor, block: Tensor) -> bool:
    return (
        launchable(acc, block)
        and acc.dtype == torch.float32
        and block.dtype in KERNEL_DTYPES
        and block.shape[0] > 0
        and block.shape[1] > 0
    )


def gram_accumulate(acc: Tensor, block: Tensor, *, split_k: int = 0) -> Tensor:
    r"""Return :math:`\mathrm{acc} + B B^\top` for ``block`` :math:`B` (``[M, n]``) and a
    float32 ``acc`` (``[M, M]``), with the Triton kernel where it can run (see the module
    docstring), else with torch.

    :param acc: the ``[M, M]`` accumulator (not modified).
    :param block: the ``[M, n]`` Jacobian block, float32, float16 or bfloat16 (read as is,
        products accumulated in float32).
    :param split_k: number of column chunks (``0``: chosen from the shape and the number of
        streaming multiprocessors). Ignored by the torch path.

    >>> import torch
    >>> b = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.bfloat16)
    >>> gram_accumulate(torch.zeros(2, 2), b)
    tensor([[ 5.,  2.],
            [ 2., 10.]])
    """
    _check(acc, block)
    if _use_kernel(acc, block):
        return torch.ops.jdoptim.gram_accumulate(acc, block, split_k)
    return gram_accumulate_reference(acc, block)


def _plan(m: int, n: int, device: torch.device, split_k: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_K, splits, columns per split)`` for an ``[m, n]`` block."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_k = 64
    n_b = math.ceil(m / block_m)
    k_tiles = math.ceil(n / block_k)
    if split_k <= 0:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            split_k = math.ceil(4 * sms / (n_b * (n_b + 1) // 2))
        else:
            split_k = 1
    tiles_per_split = math.ceil(k_tiles / max(1, min(split_k, k_tiles)))
    splits = math.ceil(k_tiles / tiles_per_split)
    return block_m, block_k, splits, tiles_per_split * block_k


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _gram_kernel(
        J,
        P,
        M,
        N,
        K_PER_SPLIT,
        stride_jm,
        stride_jn,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """``P[s] = J[:, chunk s] @ J[:, chunk s].T`` for tile ``(i, j)``, ``i <= j``, mirrored."""
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
        pid_s = tl.program_id(2)
        if pid_i <= pid_j:
            rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
            rows_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_i = rows_i < M
            mask_j = rows_j < M
            # int64 offsets: M * n may exceed 2**31 elements.
            rows_i64 = rows_i.to(tl.int64)
            rows_j64 = rows_j.to(tl.int64)
            k_begin = pid_s * K_PER_SPLIT
            acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K_PER_SPLIT, BLOCK_K):
                cols = k_begin + k0 + tl.arange(0, BLOCK_K)
                mask_k = cols < N
                a = tl.load(
                    J + rows_i64[:, None] * stride_jm + cols[None, :] * stride_jn,
                    mask=mask_i[:, None] & mask_k[None, :],
                    other=0.0,
                )
                b = tl.load(
                    J + rows_j64[:, None] * stride_jm + cols[None, :] * stride_jn,
                    mask=mask_j[:, None] & mask_k[None, :],
                    other=0.0,
                )
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IEEE:
                    acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(b), acc)
            diagonal = pid_i == pid_j
            acc = tl.where(diagonal, 0.5 * (acc + tl.trans(acc)), acc)
            base = P + pid_s * M * M
            mask = mask_i[:, None] & mask_j[None, :]
            tl.store(base + rows_i[:, None] * M + rows_j[None, :], acc, mask=mask)
            if pid_i != pid_j:
                tl.store(base + rows_j[None, :] * M + rows_i[:, None], acc, mask=mask)

    @triton_op("jdoptim::gram_accumulate", mutates_args=())
    def _gram_op(acc: Tensor, block: Tensor, split_k: int) -> Tensor:
        m, n = block.shape
        block_m, block_k, splits, per_split = _plan(m, n, block.device, split_k)
        partial = torch.empty(splits, m, m, dtype=torch.float32, device=block.device)
        n_b = triton.cdiv(m, block_m)
        wrap_triton(_gram_kernel)[(n_b, n_b, splits)](
            block,
            partial,
            m,
            n,
            per_split,
            block.stride(0),
            block.stride(1),
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            IEEE=block.dtype == torch.float32 and ieee_fp32(),
            UPCAST=upcast_bf16(block.dtype),
        )
        return acc + partial.sum(0)

    def _gram_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    def _gram_backward(ctx, grad):
        (block,) = ctx.saved_tensors
        grad_block = ((grad + grad.mT) @ block.to(grad.dtype)).to(block.dtype)
        return grad, grad_block, None

    _gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)
