r"""Fused Triton kernel for the per-sample Gramian of a linear layer (ghost Gram).

For a weight applied position-wise in ``G`` groups, with inputs :math:`a_{gbt} \in
\mathbb{R}^d` and output gradients :math:`\delta_{gbkt} \in \mathbb{R}^p` (sample ``b``, loss
``k`` of that sample, position ``t``), the Gramian of the per-sample gradients
:math:`\sum_t \delta_{gbkt} a_{gbt}^\top` (plus :math:`\sum_t \delta_{gbkt}` for a bias) is

.. math::
    \mathcal{G}_{bk,cl} = \sum_g \sum_{t,s} \big(a_{gbt} \cdot a_{gcs} + \beta\big)
    \big(\delta_{gbkt} \cdot \delta_{gcls}\big), \qquad \beta = [\text{bias}],

which for ``T = 1`` is :math:`(A A^\top + \beta) \circ (\Delta \Delta^\top)`. Torch computes it
by forming :math:`A A^\top` (``[BT, BT]``) and :math:`\Delta\Delta^\top` (``[BKT, BKT]``) in
memory. The kernel instead gives each program one output tile (a block of samples ``b``, a block
of samples ``c``, one pair ``(k, l)``); it forms the ``(b, t) x (c, s)`` tiles of both inner
products in registers with ``tl.dot`` (inputs read in their dtype, float32 accumulation),
multiplies them, and reduces over ``t`` and ``s`` on the spot: nothing of size ``(BT)^2`` goes
to memory. Only tiles with ``(b-block, k) <= (c-block, l)`` are computed; each is mirrored, and
diagonal tiles are symmetrised.

On CUDA it is a ``torch.library.triton_op`` (traced by ``torch.compile``); elsewhere
:func:`linear_gram` computes the same thing with torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import HAS_TRITON, KERNEL_DTYPES, ieee_fp32, launchable, next_pow2, upcast_bf16

__all__ = ["linear_gram", "linear_gram_reference", "per_sample_linear_gram"]


def linear_gram_reference(A: Tensor, D: Tensor, bias: bool) -> Tensor:
    r"""The torch path of :func:`linear_gram`: forms :math:`AA^\top` and :math:`DD^\top`.

    >>> import torch
    >>> A = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])  # G=1, B=2, T=1, d=2
    >>> D = torch.tensor([[[[[2.0]]], [[[1.0]]]]])  # G=1, B=2, K=1, T=1, p=1
    >>> linear_gram_reference(A, D, bias=False).reshape(2, 2)
    tensor([[4., 2.],
            [2., 2.]])
    """
    G, B, T, d = A.shape
    K, p = D.shape[2], D.shape[-1]
    dtype = torch.promote_types(torch.promote_types(A.dtype, D.dtype), torch.float32)
    Af = A.to(dtype).reshape(G, B * T, d)
    AA = Af @ Af.mT
    if bias:
        AA = AA + 1
    Df = D.to(dtype).reshape(G, B * K * T, p)
    DD = Df @ Df.mT
    prod = DD.reshape(G, B, K, T, B, K, T) * AA.reshape(G, B, 1, T, B, 1, T)
    return prod.sum(dim=(0, 3, 6))


def _check(A: Tensor, D: Tensor) -> None:
    # Validation of static shapes only (no tensor values are read).
    if A.ndim != 4 or D.ndim != 5:
        raise ValueError(
            "`A` should be [G, B, T, d] and `D` [G, B, K, T, p], got shapes "
            f"{tuple(A.shape)} and {tuple(D.shape)}."
        )
    G, B, T, _ = A.shape
    if (D.shape[0], D.shape[1], D.shape[3]) != (G, B, T):
        raise ValueError(
            f"`A` {tuple(A.shape)} and `D` {tuple(D.shape)} disagree on G, B or T "
            "(A is [G, B, T, d], D is [G, B, K, T, p])."
        )


def _use_kernel(A: Tensor, D: Tensor) -> bool:
    return (
        launchable(A, D)
        and A.dtype in KERNEL_DTYPES
        and D.dtype in KERNEL_DTYPES
        and A.dtype == D.dtype
        and A.numel() > 0
        and D.numel() > 0
    )


def linear_gram(A: Tensor, D: Tensor, bias: bool = False) -> Tensor:
    r"""Per-sample Gramian ``[B, K, B, K]`` of a (grouped, position-wise) linear layer.

    :param A: layer inputs ``[G, B, T, d]`` (``G`` groups, ``B`` samples, ``T`` positions).
    :param D: gradients of the losses with respect to the layer outputs ``[G, B, K, T, p]``
        (``K`` losses per sample).
    :param bias: add the bias term (:math:`\beta = 1` in the module docstring's formula).

    The kernel runs on CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) of float32,
    float16 or bfloat16 (same dtype for both), and returns float32; otherwise torch computes it
    in the promotion of the input dtypes with float32.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> a, delta = torch.randn(4, 3, 5), torch.randn(4, 3, 2)  # B=4, T=3, d=5, p=2
    >>> Gram = linear_gram(a[None], delta[None, :, None], bias=True)[:, 0, :, 0]
    >>> J = torch.cat([torch.einsum("btp,btd->bpd", delta, a).flatten(1), delta.sum(1)], 1)
    >>> torch.allclose(Gram, J @ J.T, atol=1e-4)
    True
    """
    _check(A, D)
    if _use_kernel(A, D):
        return torch.ops.jdoptim.linear_gram(A, D, bias)
    return linear_gram_reference(A, D, bias)


def per_sample_linear_gram(a: Tensor, delta: Tensor, bias: bool = False) -> Tensor:
    r"""Per-sample Gramian ``[B, B]`` of ``nn.Linear`` from its inputs and output gradients.

    ``a`` is ``[B, d]`` and ``delta`` ``[B, p]`` (:math:`G_{bc} = (a_b \cdot a_c + \beta)
    (\delta_b \cdot \delta_c)`), or ``[B, T, d]`` and ``[B, T, p]`` for a layer applied at
    ``T`` positions (:math:`G_{bc} = \sum_{t,s} (a_{bt} \cdot a_{cs} + \beta)(\delta_{bt}
    \cdot \delta_{cs})`).

    >>> import torch
    >>> a, delta = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[1.0], [3.0]])
    >>> per_sample_linear_gram(a, delta)
    tensor([[5., 6.],
            [6., 9.]])
    """
    if a.ndim not in (2, 3) or delta.ndim != a.ndim or a.shape[:-1] != delta.shape[:-1]:
        raise ValueError(
            "`a` and `delta` should be [B, d] and [B, p], or [B, T, d] and [B, T, p]; got "
            f"{tuple(a.shape)} and {tuple(delta.shape)}."
        )
    if a.ndim == 2:
        a, delta = a[:, None], delta[:, None]
    return linear_gram(a[None], delta[None, :, None], bias)[:, 0, :, 0]


def _plan(B: int, T: int, d: int, p: int) -> tuple[int, int, int, int]:
    """``(BB, TT, BLOCK_D, BLOCK_P)``: samples and positions per row tile (``BB * TT`` rows,
    a power of two in ``[16, 64]``) and the inner-dimension tile sizes."""
    tt = min(next_pow2(T), 64)
    rows = min(64, max(16, next_pow2(B) * tt))
    bb = max(1, rows // tt)
    block_d = min(64, max(16, next_pow2(d)))
    block_p = min(64, max(16, next_pow2(p)))
    return bb, tt, block_d, block_p


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _inner_tile(
        X,
        off_i,
        off_j,
        mask_i,
        mask_j,
        n,
        stride_n,
        ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """``X[rows i] @ X[rows j].T`` (rows given by element offsets), float32."""
        out = tl.zeros((ROWS, ROWS), dtype=tl.float32)
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask_n = cols < n
            x = tl.load(
                X + off_i[:, None] + cols[None, :] * stride_n,
                mask=mask_i[:, None] & mask_n[None, :],
                other=0.0,
            )
            y = tl.load(
                X + off_j[:, None] + cols[None, :] * stride_n,
                mask=mask_j[:, None] & mask_n[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            if IEEE:
                out = tl.dot(x, tl.trans(y), out, input_precision="ieee")
            else:
                out = tl.dot(x, tl.trans(y), out)
        return out

    @triton.jit
    def _linear_gram_kernel(
        A,
        D,
        Out,
        NG,
        B,
        K,
        T,
        d,
        p,
        sa_g,
        sa_b,
        sa_t,
        sa_d,
        sd_g,
        sd_b,
        sd_k,
        sd_t,
        sd_p,
        BIAS: tl.constexpr,
        BB: tl.constexpr,
        TT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One ``[BB, BB]`` tile of ``Out[b, k, c, l]`` (b-block i, c-block j, pair (k, l))."""
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
        pid_kl = tl.program_id(2)
        k = pid_kl // K
        l = pid_kl % K
        if (pid_i < pid_j) | ((pid_i == pid_j) & (k <= l)):
            r = tl.arange(0, ROWS)
            # int64 offsets: B * T * d may exceed 2**31 elements.
            b_i = (pid_i * BB + r // TT).to(tl.int64)
            b_j = (pid_j * BB + r // TT).to(tl.int64)
            acc = tl.zeros((BB, BB), dtype=tl.float32)
            for g in range(0, NG):
                for t0 in range(0, T, TT):
                    t_i = t0 + r % TT
                    m_i = (b_i < B) & (t_i < T)
                    a_i = g * sa_g + b_i * sa_b + t_i * sa_t
                    d_i = g * sd_g + b_i * sd_b + k * sd_k + t_i * sd_t
                    for s0 in range(0, T, TT):
                        s_j = s0 + r % TT
                        m_j = (b_j < B) & (s_j < T)
                        a_j = g * sa_g + b_j * sa_b + s_j * sa_t
                        d_j = g * sd_g + b_j * sd_b + l * sd_k + s_j * sd_t
                        aa = _inner_tile(
                            A, a_i, a_j, m_i, m_j, d, sa_d, ROWS, BLOCK_D, IEEE, UPCAST
                        )
                        dd = _inner_tile(
                            D, d_i, d_j, m_i, m_j, p, sd_p, ROWS, BLOCK_P, IEEE, UPCAST
                        )
                        if BIAS:
                            aa = aa + 1.0
                        prod = aa * dd  # masked rows: dd = 0 (and aa = 0 or the bias 1)
                        if TT == 1:
                            acc += prod
                        else:
                            prod4 = tl.reshape(prod, (BB, TT, BB, TT))
                            acc += tl.sum(tl.sum(prod4, axis=3), axis=1)
            diagonal = (pid_i == pid_j) & (k == l)
            acc = tl.where(diagonal, 0.5 * (acc + tl.trans(acc)), acc)
            o_b = (pid_i * BB + tl.arange(0, BB)).to(tl.int64)
            o_c = (pid_j * BB + tl.arange(0, BB)).to(tl.int64)
            mask = (o_b < B)[:, None] & (o_c < B)[None, :]
            tl.store(Out + ((o_b[:, None] * K + k) * B + o_c[None, :]) * K + l, acc, mask=mask)
            if (pid_i != pid_j) | (k != l):
                tl.store(Out + ((o_c[None, :] * K + l) * B + o_b[:, None]) * K + k, acc, mask=mask)

    @triton_op("jdoptim::linear_gram", mutates_args=())
    def _linear_gram_op(A: Tensor, D: Tensor, bias: bool) -> Tensor:
        G, B, T, d = A.shape
        K, p = D.shape[2], D.shape[4]
        bb, tt, block_d, block_p = _plan(B, T, d, p)
        out = torch.empty(B, K, B, K, dtype=torch.float32, device=A.device)
        n_b = triton.cdiv(B, bb)
        wrap_triton(_linear_gram_kernel)[(n_b, n_b, K * K)](
            A,
            D,
            out,
            G,
            B,
            K,
            T,
            d,
            p,
            *A.stride(),
            *D.stride(),
            BIAS=bias,
            BB=bb,
            TT=tt,
            ROWS=bb * tt,
            BLOCK_D=block_d,
            BLOCK_P=block_p,
            IEEE=A.dtype == torch.float32 and ieee_fp32(),
            UPCAST=upcast_bf16(A.dtype),
        )
        return out
