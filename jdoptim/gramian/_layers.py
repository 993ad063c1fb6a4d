r"""Per-sample gradient *factors* of the layer-wise engine and the per-module rules that make them.

Everything here works in an internal layout where a per-sample quantity has leading dimensions
``[B, K]``: ``B`` samples along the batch dimension and ``K`` losses per sample (``K = 1`` for a
loss vector of shape ``[B]``). The per-sample Gramian is a ``[B, K, B, K]`` tensor.

A *factor* describes the per-sample gradients of one or more parameters without (necessarily)
materialising them:

* :class:`LinearFactor`: a weight whose per-sample gradient is
  :math:`g_{bk} = \sum_t \delta^k_{bt} a_{bt}^\top` (``nn.Linear``; ``nn.Conv1d/2d`` after
  ``unfold``, one block per group, :class:`ConvFactor`), with an optional bias
  :math:`\sum_t \delta^k_{bt}`;
* :class:`EmbeddingFactor`: ``nn.Embedding``, :math:`g_{bk} = \sum_t e_{i_{bt}}
  (\delta^k_{bt})^\top`;
* :class:`PerSample`: per-sample gradients ``[B, K, n]`` held in memory.

A *rule* says what a forward hook stores for one module type (:meth:`Rule.save`), whether a
stored call is per-sample (:meth:`Rule.valid`), and which factors it yields once the gradients of
the losses with respect to the module's output are known (:meth:`Rule.factors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._graph import graph_visible, saved_tensor_hooks_active
from ._kernels import linear_gram_kernel
from ._scale import exponent, exponents, known_zero, pow2, unless_zero

_RMSNorm = getattr(nn, "RMSNorm", nn.LayerNorm)

Want = Callable[[int], bool]
"""``want(i)`` is true when the engine parameter of index ``i`` is differentiated."""


@dataclass(frozen=True)
class Dims:
    """Static sizes of one Gramian computation."""

    B: int
    K: int
    batch_dim: int
    """The batch dimension of the layers' inputs and outputs."""
    loss_dim: int = 0
    """The batch dimension of the losses."""


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without a dispatch when ``x`` has it already (the engine makes hundreds of
    such no-op casts a step; each costs about a microsecond)."""
    return x if x.dtype == dtype else x.to(dtype)


def _flat(D: Tensor, B: int, K: int, p: int) -> Tensor:
    """``[B, K, ..., p]`` -> ``[B, K, T, p]``."""
    return D.reshape(B, K, -1, p)


class PerSample:
    r"""Per-sample gradients held in memory: ``grads[i]`` is ``[B, K, n_i]`` for parameter ``i``.

    Gramian :math:`J J^\top` with :math:`J = [J_1, \dots]` (one matrix product); weighted
    gradient :math:`\sum_{bk} w_{bk} J_{i,bk}`.
    """

    def __init__(self, grads: dict[int, Tensor]) -> None:
        self.grads = grads
        self.bounds: dict[int, Tensor] = {}
        """Exponent bounds of the gradients materialised from a factor (its ``exponent()``),
        which spare :meth:`exponent` a max-abs pass over them."""

    def add(self, other: dict[int, Tensor], bound: Tensor | None = None) -> None:
        """Add per-sample gradients; ``bound`` (optional): every entry of ``other`` is below
        ``2**bound`` up to a factor of the positions (a factor's ``exponent()``)."""
        for i, J in other.items():
            if i not in self.grads:
                self.grads[i] = J
                if bound is not None:
                    self.bounds[i] = bound
                continue
            self.grads[i] = self.grads[i] + J
            old = self.bounds.pop(i, None)
            if bound is not None and old is not None:  # a sum of two: one more binade
                self.bounds[i] = torch.maximum(old, bound) + 1

    def exponent(self) -> Tensor | None:
        """Bound on the per-sample gradients: ``max|g| < 2**exponent()`` (see ``_scale``),
        up to a factor of the positions for the gradients materialised from a factor."""
        return self.exponent_of(exponents(self.exponent_inputs()))

    def exponent_inputs(self) -> list[Tensor]:
        """The tensors whose largest entries :meth:`exponent` reads (:func:`factor_exponents`
        reads those of all factors at once): the gradients without a bound, small ones side by
        side in one tensor (one pair of reductions instead of one per gradient: only their
        largest entry counts; e.g. the norms' affine gradients)."""
        exact = [J for i, J in self.grads.items() if i not in self.bounds]
        if torch.compiler.is_compiling():  # fused there anyway (and Inductor 2.13 mis-strides
            return exact  # a concatenation of the generic rule's gradients)
        small = [J for J in exact if J.numel() <= JOIN_NUMEL]
        if len(small) < 2 or len({(J.dtype, J.device, J.shape[:-1]) for J in small}) != 1:
            return exact
        return [J for J in exact if J.numel() > JOIN_NUMEL] + [torch.cat(small, dim=-1)]

    def exponent_of(self, es: list[Tensor]) -> Tensor | None:
        """:meth:`exponent` from the exponents ``es`` of :meth:`exponent_inputs`."""
        if not self.grads:
            return None
        bounds = [self.bounds[i] for i in self.grads if i in self.bounds]
        return torch.stack([*bounds, *es]).amax()

    def gram(self, dims: Dims, shift: Tensor | None = None) -> Tensor | None:
        """The per-sample Gramian of the gradients scaled by ``2**-shift``."""
        if not self.grads:
            return None
        BK = dims.B * dims.K
        Js = [J.reshape(BK, -1) for J in self.grads.values()]
        # The pass that multiplies by 2**-shift is skipped when shift = 0 (see unless_zero).
        G = unless_zero(shift, _gram_sum, _scaled_gram_sum, Js)
        return G.reshape(dims.B, dims.K, dims.B, dims.K)

    def weighted(self, w: Tensor) -> dict[int, Tensor]:
        row = w.reshape(1, -1)  # one product each (einsum costs more to dispatch)
        return {i: (row @ J.reshape(row.shape[1], -1)).reshape(-1) for i, J in self.grads.items()}


JOIN_NUMEL = 2**14
"""Stored per-sample gradients of at most this many numbers are read side by side for their
exponent bound (:meth:`PerSample.exponent_inputs`)."""


def _gram_sum(*Js: Tensor) -> Tensor:
    r""":math:`\sum_i J_i J_i^\top`: one product per parameter, no copy of all the gradients
    into one matrix (``t()``, not ``mT``: ``torch.cond`` refuses aliased inputs)."""
    G = torch.mm(Js[0], Js[0].t())
    for J in Js[1:]:
        G = torch.addmm(G, J, J.t())
    return G


def _scaled_gram_sum(shift: Tensor, *Js: Tensor) -> Tensor:
    """:func:`_gram_sum` of the gradients scaled by ``2**-shift``."""
    c = pow2(-shift, Js[0].dtype)
    return _gram_sum(*(J * c for J in Js))


def _pairwise(B: int, K: int, T: int, p: int) -> int:
    """Multiply-adds of the ghost Gramian formed pairwise: every ``(b, k, t)`` against every
    ``(c, l, s)`` (cheap when ``T = 1`` or ``K = 1``)."""
    return (B * K * T) ** 2 * (p + 1)


def _kernel_first(B: int, K: int, T: int, p: int) -> int:
    """Multiply-adds of the ghost Gramian formed kernel-first: the input kernel ``AA^T`` applied
    to the output gradients, then one product per sample pair (cheap for ``K, T > 1``, e.g.
    multi-task losses over a whole batch)."""
    return (B * T) ** 2 * K * p + (B * K) ** 2 * T * p


def _weight_grads(D: Tensor, A: Tensor) -> Tensor:
    r"""Per-sample weight gradients ``[B, K, G p d]`` of a linear factor's ``D`` and ``A``:
    :math:`\sum_t D_{gbkt} A_{gbt}^\top`."""
    G, B, K, T, p = D.shape
    d = A.shape[-1]
    # One bmm over (g, b): [K p, T] @ [T, d] (D read transposed, a view for K = 1); einsum's
    # own arrangement of the same product took 10-25 us more a layer (W4 shapes).
    lhs = D.permute(0, 1, 2, 4, 3).reshape(G * B, K * p, T)
    J = torch.bmm(lhs, A.reshape(G * B, T, d)).reshape(G, B, K, p * d)
    return J.reshape(B, K, -1) if G == 1 else J.permute(1, 2, 0, 3).reshape(B, K, -1)


def _gram_rows(D: Tensor, A: Tensor) -> Tensor:
    r"""The per-sample weight gradients of :func:`_weight_grads` as ``[B K, G d p]`` rows, each
    row's entries in an order of their own (transposed blocks :math:`A_{gbt}^\top`-first):
    fit only for products of rows with rows (the Gramian :math:`J J^\top` does not depend on
    the order of the columns). For one loss per sample, ``A`` is read transposed and ``D`` as
    it is (no copy of ``D`` transposed, as :func:`_weight_grads` makes): 20-30% faster to form
    on W4's layers."""
    G, B, K, T, p = D.shape
    if K != 1:
        return _weight_grads(D, A).reshape(B * K, -1)
    d = A.shape[-1]
    J = torch.bmm(A.reshape(G * B, T, d).transpose(1, 2), D.reshape(G * B, T, p))
    if G == 1:
        return J.reshape(B, d * p)
    return J.reshape(G, B, d * p).transpose(0, 1).reshape(B, -1)


def _bias_grads(D: Tensor) -> Tensor:
    r"""Per-sample bias gradients ``[B, K, G p]``: :math:`\sum_t D_{gbkt}`."""
    B, K = D.shape[1], D.shape[2]
    return D.sum(3).permute(1, 2, 0, 3).reshape(B, K, -1)


class LinearFactor:
    r"""Weight (and bias) of a linear map applied position-wise, in ``G`` independent groups.

    ``A`` is ``[G, B, T, d]`` (inputs), ``D`` is ``[G, B, K, T, p]`` (gradients of the losses with
    respect to the outputs). The per-sample gradient of the weight block of group ``g`` is
    :math:`\sum_t D_{gbkt} A_{gbt}^\top \in \mathbb{R}^{p \times d}`; its Gramian, without
    forming it, is

    .. math:: \mathcal{G}_{bk,cl} = \sum_g \sum_{t,s} (A_{gbt} \cdot A_{gcs} + [\text{bias}])
        (D_{gbkt} \cdot D_{gcls}),

    the ``+1`` folding in the bias, whose per-sample gradient is :math:`\sum_t D_{gbkt}`. It is
    formed in the cheaper of two orders: *pairwise* (all ``(b, k, t)`` against all ``(c, l, s)``,
    :math:`(BKT)^2 (p + 1)` multiply-adds) or *kernel-first* (:math:`\sum_s (AA^\top)_{bt, cs}
    D_{gcls}` first, then one product per pair of samples: :math:`(BT)^2 Kp + (BK)^2 Tp`, far
    cheaper for ``K`` losses over ``T`` positions, e.g. multi-task losses over a whole batch).
    """

    def __init__(self, weight: int, bias: int | None, A: Tensor, D: Tensor) -> None:
        self.weight, self.bias, self.A, self.D = weight, bias, A, D

    @property
    def params(self) -> tuple[int, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def in_features(self) -> int:
        """``d``: the inputs' size per position and group."""
        return self.A.shape[-1]

    @property
    def key(self) -> tuple:
        G, p = self.D.shape[0], self.D.shape[-1]
        return ("linear", self.weight, self.bias, G, self.in_features, p)

    @staticmethod
    def concat(factors: list[LinearFactor]) -> LinearFactor:
        """Several calls of the same weight: the positions of all calls, side by side."""
        if len(factors) == 1:
            return factors[0]
        f = factors[0]
        return LinearFactor(
            f.weight,
            f.bias,
            torch.cat([g.A for g in factors], dim=2),
            torch.cat([g.D for g in factors], dim=3),
        )

    def costs(self) -> tuple[int, int]:
        """Multiply-adds of (ghost, materialised), Gramian plus weighted gradient."""
        G, B, K, T, p = self.D.shape
        d = self.in_features
        db = d + (self.bias is not None)
        ghost = G * ((B * T) ** 2 * d + min(_pairwise(B, K, T, p), _kernel_first(B, K, T, p)))
        ghost += G * B * T * p * db
        mat = G * (B * K * T * p * db + (B * K) ** 2 * p * db + B * K * p * db)
        return ghost, mat

    def materialize(self) -> dict[int, Tensor]:
        out = {self.weight: _weight_grads(self.D, self.A)}
        if self.bias is not None:
            out[self.bias] = _bias_grads(self.D)
        return out

    def _inputs(self) -> list[Tensor]:
        """Tensors holding every entry of the inputs ``A``: ``A`` itself."""
        return [self.A]

    def _input_exponent(self, es: list[Tensor] | None = None) -> Tensor:
        """``y``: the inputs (and the bias's constant input 1) are below ``2**y``; ``es``: the
        exponents of :meth:`_inputs` (read if not given, unless :meth:`exponent_of` did)."""
        y = getattr(self, "_y", None)
        if es is None and y is not None:
            return y
        es = exponents(self._inputs()) if es is None else es
        e = es[0] if len(es) == 1 else torch.stack(es).amax()
        self._y = e if self.bias is None else e.clamp(min=1)
        return self._y

    def exponent(self) -> Tensor:
        """Bound on the per-sample gradients (up to the factor ``T``): ``max|D| max|A|``."""
        return self.exponent_of(exponents(self.exponent_inputs()))

    def exponent_inputs(self) -> list[Tensor]:
        """The tensors whose largest entries :meth:`exponent` reads: ``D`` and the inputs."""
        return [self.D, *self._inputs()]

    def exponent_of(self, es: list[Tensor]) -> Tensor:
        """:meth:`exponent` from the exponents ``es`` of :meth:`exponent_inputs`."""
        return es[0] + self._input_exponent(es[1:])

    def _scaled(self, shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``A`` scaled by ``c = 2**-y`` (below 1), ``D`` by ``2**(y - shift)``, and ``c`` (the
        bias's input 1, scaled like the inputs): the factors of the gradients scaled by
        ``2**-shift``. ``shift=None``: the factors as they are and ``c = None``."""
        if shift is None:
            return self.A, self.D, None
        y = self._input_exponent()
        c = pow2(-y, self.A.dtype)
        return self.A * c, self.D * pow2(y - shift, self.D.dtype), c

    def gram(self, dims: Dims, shift: Tensor | None = None) -> Tensor:
        """The per-sample Gramian of the gradients scaled by ``2**-shift``: the inputs are
        scaled by ``2**-y`` (below 1) and the output gradients by ``2**(y - shift)``."""
        G, B, T, d = self.A.shape
        K, p = dims.K, self.D.shape[-1]
        A, D, c = self._scaled(None if known_zero(shift) else shift)  # eager CPU, 0: as is
        one = None if c is None else c * c
        kernel_first = _kernel_first(B, K, T, p) < _pairwise(B, K, T, p)
        kernel = linear_gram_kernel(self.A.device.type)
        if kernel is not None and not kernel_first:
            # The fused Triton kernel of jdoptim.kernels (CUDA) forms the pairwise order; the
            # bias is then one more input column (the kernel adds an unscaled 1).
            if self.bias is not None and one is not None:
                A = torch.cat([A, c.expand(*A.shape[:-1], 1)], dim=-1)
                return kernel(A, D, False)
            return kernel(A, D, self.bias is not None)
        Af = A.reshape(G, B * T, d)
        AA = Af @ Af.mT
        if self.bias is not None:
            AA = AA + (1 if one is None else one)
        if kernel_first:
            # KD[g, c, l, (b, t), q] = sum_s AA[g, (b, t), (c, s)] D[g, c, l, s, q]; for B = 1
            # (multi-task losses over a whole batch) neither product copies D or KD.
            AAc = AA.reshape(G, B * T, B, T).permute(0, 2, 1, 3).unsqueeze(2)
            KD = (AAc @ D).reshape(G, B, K, B, T * p).permute(0, 3, 1, 2, 4)
            out = D.reshape(G, B, 1, K, T * p) @ KD.mT  # [g, b, c, k, l]
            return out.sum(0).permute(0, 2, 1, 3)
        Df = D.reshape(G, B * K * T, p)
        DD = Df @ Df.mT
        prod = DD.reshape(G, B, K, T, B, K, T) * AA.reshape(G, B, 1, T, B, 1, T)
        return prod.sum(dim=(0, 3, 6))

    def weighted(self, w: Tensor) -> dict[int, Tensor]:
        G, B, T, d = self.A.shape
        K, p = self.D.shape[2], self.D.shape[-1]
        if K == 1 and G == 1:  # one group (Linear), one loss per sample: 2-D products
            if d < p:
                # The weights on the narrower factor (A here: one pass over B T d numbers
                # instead of B T p); the bias then from the per-sample sums of D.
                A2 = (self.A * w.reshape(1, B, 1, 1)).reshape(B * T, d)
                out = {self.weight: torch.mm(self.D.reshape(B * T, p).t(), A2).reshape(-1)}
                if self.bias is not None:
                    Ds = self.D.reshape(B, T, p).sum(1)
                    out[self.bias] = torch.mv(Ds.t(), w.reshape(B))
                return out
            D2 = (self.D * w.reshape(1, B, 1, 1, 1)).reshape(B * T, p)
            out = {self.weight: torch.mm(D2.t(), self.A.reshape(B * T, d)).reshape(-1)}
            if self.bias is not None:
                out[self.bias] = D2.sum(0)
            return out
        if K == 1:  # a product by the weights (einsum costs more to dispatch)
            Dw = (self.D.squeeze(2) * w.reshape(1, B, 1, 1)).reshape(G, B * T, p)
        else:
            Dw = torch.einsum("bk,gbktp->gbtp", w, self.D).reshape(G, B * T, p)
        out = {self.weight: (Dw.mT @ self.A.reshape(G, B * T, d)).reshape(-1)}
        if self.bias is not None:
            out[self.bias] = Dw.sum(1).reshape(-1)
        return out


FORMED_MAX_POSITIONS = 32
r"""A materialised linear factor drops its per-sample gradients after its Gramian block
(:class:`FormedLinearFactor`) while it has at most ``FORMED_MAX_POSITIONS * K`` positions per
sample: its weighted gradient is then one product :math:`(w \cdot D)^\top A` of ``B T p d``
multiply-adds, cheaper than reading the ``B K p d`` stored gradients back (a product runs about
30 multiply-adds in the time memory delivers one float). Convolutions over many positions keep
their gradients (:class:`PerSample`)."""


class FormedLinearFactor(LinearFactor):
    r"""A :class:`LinearFactor` whose Gramian block is formed from its per-sample gradients
    :math:`J_{bk} = \sum_t D_{bkt} A_{bt}^\top` (cheaper than the ghost form when positions are
    many and layers narrow, e.g. sequence models), materialised one factor at a time and dropped
    at once: the weighted gradient comes from ``A`` and ``D`` (:meth:`LinearFactor.weighted`),
    so no per-sample gradient outlives its block (peak memory: one layer's, not the model's).

    Scaling: the inputs are scaled by :math:`2^{-y}` and the output gradients by
    :math:`2^{y-s}` before the product (two passes over the small factors, none over
    :math:`J`), so the block is that of :math:`2^{-s} J`, as for the ghost form. A bias is the
    weight of one more input column, constant (:math:`2^{-y}` once scaled): its gradients are
    formed with the weight's, in the same product.
    """

    @staticmethod
    def of(f: LinearFactor) -> FormedLinearFactor:
        return FormedLinearFactor(f.weight, f.bias, f.A, f.D)

    def gram(self, dims: Dims, shift: Tensor | None = None) -> Tensor:
        """The per-sample Gramian of the gradients scaled by ``2**-shift``."""
        # Eager CPU with shift 0: nothing to scale.
        A, D, c = self._scaled(None if known_zero(shift) else shift)
        if self.bias is not None:
            # The bias is the weight of a constant input (1, or c once scaled): one more
            # column of A, so that one product forms both blocks (a separate bias block cost
            # more than the wider product: W4, 8 layers, about 0.4 ms a step).
            one = A.new_ones(*A.shape[:-1], 1) if c is None else c.expand(*A.shape[:-1], 1)
            A = torch.cat([A, one], dim=-1)
        elif (A.shape[0] * D.shape[-1] * A.shape[-1]) % ALIGNED_ROWS == 0:
            # A zero input column (zero gradients, the same Gramian): rows of a multiple of
            # ALIGNED_ROWS numbers make J J^T about 30% slower on CPU (cache-set conflicts).
            A = torch.cat([A, A.new_zeros(*A.shape[:-1], 1)], dim=-1)
        J = _gram_rows(D, A)  # rows in their own column order: only J J^T is formed
        G = J @ J.mT
        return G.reshape(dims.B, dims.K, dims.B, dims.K)


ALIGNED_ROWS = 1024
"""A :class:`FormedLinearFactor` without bias whose per-sample gradients have a multiple of this
many numbers forms them with a zero input column: the product :math:`J J^\top` of ``[B K, n]``
gradients runs 25-35% slower when ``n`` is a multiple of 1024 (MKL, one thread, AVX-512; for
``n = 4096, 8192, 12288``: 105, 221, 304 us against 72, 150, 211 us 64 numbers further)."""


CONV_CHUNK_BYTES = 2 * 2**20
"""Bytes of unfolded inputs (patches) that :meth:`ConvFactor.materialize` forms at once: the
per-sample gradients of a convolution are formed for as many samples at a time as fit (at
least one), so the whole batch's patches (``B T C_in k_h k_w`` numbers, often several times the
layer's input) never exist at once. Chunks of 1-4 MiB are as fast as one product over the
whole batch on CPU (W3: 2 MiB, 8 chunks of 4 samples for its second convolution)."""

CONV_MAX_CHUNKS = 16
"""At most this many chunks per convolution (larger chunks for large batches): a compiled step
unrolls the loop over the chunks, so its graph (and compile time) grows with their number."""


@dataclass(frozen=True)
class ConvCall:
    """One call of a convolution: its input ``x`` ``[B, C_in, H, W]`` (a ``Conv1d``'s with
    ``H = 1``), unpadded and in the layer's dtype, and the geometry that turns it into
    patches."""

    x: Tensor
    pads: tuple[int, ...]
    """``F.pad`` amounts (last dimension first), all zero for none."""
    mode: str
    """``F.pad`` mode."""
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    stride: tuple[int, int]
    groups: int

    def patches(self, lo: int, hi: int) -> Tensor:
        """Unfolded inputs ``[G, n, T, d]`` of samples ``lo:hi``."""
        x = self.x[lo:hi]
        if any(self.pads):
            x = F.pad(x, list(self.pads), mode=self.mode)
        cols = _unfold(x, self.kernel, self.dilation, self.stride)  # [n, C_in * k, T]
        return cols.reshape(x.shape[0], self.groups, -1, cols.shape[-1]).permute(1, 0, 3, 2)


class ConvFactor(LinearFactor):
    r"""The :class:`LinearFactor` of ``nn.Conv1d`` / ``nn.Conv2d`` calls that keeps the calls'
    inputs (:class:`ConvCall`) instead of their patches ``A``: the per-sample gradients
    (:meth:`materialize`, the usual route for convolutions over many positions) are formed
    :data:`CONV_CHUNK_BYTES` of patches at a time, so the peak memory is that of the gradients
    (``B K C_out C_in k_h k_w / G`` numbers), not that of the whole batch's patches
    (``B T C_in k_h k_w``).

    ``A`` (the ghost and formed routes, which pay ``(BT)^2`` or keep few positions) unfolds all
    samples when read. The exponent bound of the inputs is that of ``x``: the patches only copy
    entries of ``x`` (or of its padding, zeros or copies of entries), so ``max|A| <= max|x|``.
    Several calls of one convolution (:meth:`concat`) put their positions side by side, as for
    a :class:`LinearFactor`.
    """

    def __init__(
        self, weight: int, bias: int | None, calls: tuple[ConvCall, ...], D: Tensor, d: int
    ) -> None:
        self.weight, self.bias, self.calls, self.D, self.d = weight, bias, calls, D, d

    @property
    def in_features(self) -> int:
        return self.d

    @property
    def A(self) -> Tensor:  # type: ignore[override]
        """The patches of all samples, ``[G, B, T, d]`` (formed when read)."""
        return self._patches(0, self.D.shape[1])

    def _patches(self, lo: int, hi: int) -> Tensor:
        """Patches of samples ``lo:hi`` in the factor's dtype (cast per chunk: a low-precision
        input is not copied whole into the accumulation dtype)."""
        parts = [call.patches(lo, hi).to(self.D.dtype) for call in self.calls]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    @staticmethod
    def concat(factors: list[LinearFactor]) -> LinearFactor:  # type: ignore[override]
        if len(factors) == 1:
            return factors[0]
        if not all(isinstance(f, ConvFactor) for f in factors):
            return LinearFactor.concat(factors)
        f = factors[0]
        assert isinstance(f, ConvFactor)
        calls = tuple(c for g in factors for c in g.calls)  # type: ignore[attr-defined]
        return ConvFactor(f.weight, f.bias, calls, torch.cat([g.D for g in factors], dim=3), f.d)

    def chunk(self) -> int:
        """Samples per chunk of :meth:`materialize`: :data:`CONV_CHUNK_BYTES` of patches, at
        least one sample and at least ``B /`` :data:`CONV_MAX_CHUNKS`."""
        G, B, _, T, _ = self.D.shape
        fit = CONV_CHUNK_BYTES // (G * T * self.d * self.D.element_size())
        return min(B, max(1, fit, -(-B // CONV_MAX_CHUNKS)))

    def materialize(self) -> dict[int, Tensor]:
        B, n = self.D.shape[1], self.chunk()
        parts = [_weight_grads(self.D[:, lo : lo + n], self._patches(lo, lo + n))
                 for lo in range(0, B, n)]  # fmt: skip
        out = {self.weight: parts[0] if len(parts) == 1 else torch.cat(parts)}
        if self.bias is not None:
            out[self.bias] = _bias_grads(self.D)
        return out

    def _inputs(self) -> list[Tensor]:
        return [call.x for call in self.calls]

    def _linear(self) -> LinearFactor:
        return LinearFactor(self.weight, self.bias, self.A, self.D)

    def gram(self, dims: Dims, shift: Tensor | None = None) -> Tensor:
        return self._linear().gram(dims, shift)

    def weighted(self, w: Tensor) -> dict[int, Tensor]:
        return self._linear().weighted(w)


class EmbeddingFactor:
    r"""``nn.Embedding`` weight: indices ``idx`` ``[B, T]``, output gradients ``D``
    ``[B, K, T, p]`` (zero at ``padding_idx``). Ghost Gramian over matching indices:

    .. math:: \mathcal{G}_{bk,cl} = \sum_{t,s} [i_{bt} = i_{cs}]\, (D_{bkt} \cdot D_{cls}).
    """

    def __init__(self, weight: int, idx: Tensor, D: Tensor, num_embeddings: int) -> None:
        self.weight, self.idx, self.D, self.V = weight, idx, D, num_embeddings

    @property
    def params(self) -> tuple[int, ...]:
        return (self.weight,)

    @property
    def key(self) -> tuple:
        return ("embedding", self.weight, self.V, self.D.shape[-1])

    @staticmethod
    def concat(factors: list[EmbeddingFactor]) -> EmbeddingFactor:
        if len(factors) == 1:
            return factors[0]
        f = factors[0]
        idx = torch.cat([g.idx for g in factors], dim=1)
        return EmbeddingFactor(f.weight, idx, torch.cat([g.D for g in factors], dim=2), f.V)

    def costs(self) -> tuple[int, int]:
        B, K, T, p = self.D.shape
        ghost = (B * T) ** 2 + (B * K * T) ** 2 * (p + 1) + B * K * T * p
        mat = 2 * B * K * self.V * p + (B * K) ** 2 * self.V * p
        return ghost, mat

    def materialize(self) -> dict[int, Tensor]:
        return {self.weight: _embedding_grads(self.idx, self.D, self.V)}

    def exponent(self) -> Tensor:
        """Bound on the per-sample gradients (up to the factor ``T``)."""
        return exponent(self.D)

    def exponent_inputs(self) -> list[Tensor]:
        """The tensors whose largest entries :meth:`exponent` reads: ``D``."""
        return [self.D]

    def exponent_of(self, es: list[Tensor]) -> Tensor:
        """:meth:`exponent` from the exponent of ``D``."""
        return es[0]

    def gram(self, dims: Dims, shift: Tensor | None = None) -> Tensor:
        """The per-sample Gramian of the gradients scaled by ``2**-shift``."""
        B, K, T, p = self.D.shape
        flat = self.idx.reshape(B * T)
        same = (flat[:, None] == flat[None, :]).to(self.D.dtype)
        D = self.D if known_zero(shift) else self.D * pow2(-shift, self.D.dtype)
        Df = D.reshape(B * K * T, p)
        prod = (Df @ Df.mT).reshape(B, K, T, B, K, T) * same.reshape(B, 1, T, B, 1, T)
        return prod.sum(dim=(2, 5))

    def weighted(self, w: Tensor) -> dict[int, Tensor]:
        B, K, T, p = self.D.shape
        if K == 1:  # a product by the weights (einsum costs more to dispatch)
            Dw = (self.D * w.reshape(B, 1, 1, 1)).reshape(B * T, p)
        else:
            Dw = torch.einsum("bk,bktp->btp", w, self.D).reshape(B * T, p)
        out = self.D.new_zeros(self.V, p).index_add_(0, self.idx.reshape(-1), Dw)
        return {self.weight: out.reshape(-1)}


def _embedding_grads(idx: Tensor, D: Tensor, V: int) -> Tensor:
    """Per-sample gradients ``[B, K, V p]`` of an embedding weight (``idx`` ``[B, T]``, ``D``
    ``[B, K, T, p]``)."""
    B, K, T, p = D.shape
    # Row (b K + k) V + i of the [B K V, p] gradients gathers D[b, k, t] for i = idx[b, t]:
    # one index_add_ into zeros (a scatter_add along V costs a copy and index expansion).
    base = torch.arange(B * K, device=idx.device).reshape(B, K, 1) * V
    rows = (base + idx[:, None, :]).reshape(-1)
    J = D.new_zeros(B * K * V, p).index_add_(0, rows, D.reshape(-1, p))
    return J.reshape(B, K, -1)


class FormedEmbeddingFactor(EmbeddingFactor):
    r"""An :class:`EmbeddingFactor` whose Gramian block is formed from its per-sample gradients
    (``B K`` rows of ``V p`` numbers, mostly zeros) and dropped at once, as for
    :class:`FormedLinearFactor`: the weighted gradient comes from ``idx`` and ``D``
    (:meth:`EmbeddingFactor.weighted`, ``B K T p`` numbers, not the ``B K V p`` stored
    gradients), and no per-sample gradient outlives its block. Scaling by ``2**-shift`` is
    applied to ``D`` before the gradients are formed (exact: a power of 2)."""

    @staticmethod
    def of(f: EmbeddingFactor) -> FormedEmbeddingFactor:
        return FormedEmbeddingFactor(f.weight, f.idx, f.D, f.V)

    def gram(self, dims: Dims, shift: Tensor | None = None) -> Tensor:
        """The per-sample Gramian of the gradients scaled by ``2**-shift``."""
        D = self.D if known_zero(shift) else self.D * pow2(-shift, self.D.dtype)
        J = _embedding_grads(self.idx, D, self.V).reshape(dims.B * dims.K, -1)
        return torch.mm(J, J.t()).reshape(dims.B, dims.K, dims.B, dims.K)


Factor = LinearFactor | EmbeddingFactor | PerSample  # Formed*, ConvFactor: their subclasses


def factor_exponents(factors: list[Factor]) -> list[Tensor]:
    """The ``exponent()`` of every factor that has one (the others give none), the largest
    entries of all their tensors read at once (:func:`~jdoptim.gramian._scale.exponents`)."""
    inputs = [f.exponent_inputs() for f in factors]
    flat = exponents([x for xs in inputs for x in xs])
    out, k = [], 0
    for f, xs in zip(factors, inputs, strict=True):
        e = f.exponent_of(flat[k : k + len(xs)])
        k += len(xs)
        if e is not None:
            out.append(e)
    return out


# --------------------------------------------------------------------------------------- rules


class Rule:
    """How the engine handles one module type (see the module docstring)."""

    #: Short name, shown in reports.
    name = "generic"

    #: The direct parameters the rule differentiates. A module with any other direct parameter
    #: (``weight_orig`` of ``prune``, ``weight_g``/``weight_v`` of ``weight_norm``) is not
    #: covered by the rule (:func:`rule_for`).
    params: tuple[str, ...] = ()

    def save(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """What the forward hook keeps (detached)."""
        return args[0].detach()

    def valid(self, module: nn.Module, saved: Tensor, output: Tensor, dims: Dims) -> bool:
        """Whether this call is per-sample along ``dims.batch_dim`` (else: exact fallback)."""
        bd = dims.batch_dim
        return saved.ndim > bd + 1 and saved.shape[bd] == dims.B

    def factors(
        self,
        module: nn.Module,
        pidx: dict[str, int],
        saved: Tensor,
        D: Tensor,
        dims: Dims,
        want: Want,
    ) -> list[Factor]:
        """Factors of the wanted parameters; ``D`` is ``[B, K, *output dims but batch]``."""
        raise NotImplementedError


def _wanted(pidx: dict[str, int], name: str, want: Want) -> int | None:
    i = pidx.get(name)
    return i if i is not None and want(i) else None


class LinearRule(Rule):
    name = "linear"
    params = ("weight", "bias")

    def factors(self, module, pidx, saved, D, dims, want):
        B, K = dims.B, dims.K
        p = D.shape[-1]
        w, b = _wanted(pidx, "weight", want), _wanted(pidx, "bias", want)
        Dt = _flat(D, B, K, p)
        if w is None:
            return [PerSample({b: Dt.sum(2)})] if b is not None else []
        A = saved.movedim(dims.batch_dim, 0).reshape(1, B, -1, saved.shape[-1])
        return [LinearFactor(w, b, as_dtype(A, D.dtype), Dt.unsqueeze(0))]


def _conv_pads(module: nn.Conv1d | nn.Conv2d, spatial: int) -> list[int]:
    """``F.pad`` amounts (last dimension first) equivalent to the module's ``padding``."""
    ks, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            left = [0] * spatial
            right = [0] * spatial
        else:  # "same"
            total = [dil[i] * (ks[i] - 1) for i in range(spatial)]
            left = [t // 2 for t in total]
            right = [t - t // 2 for t in total]
    else:
        left = right = list(module.padding)
    pads: list[int] = []
    for i in reversed(range(spatial)):
        pads += [left[i], right[i]]
    return pads


def _unfold(x: Tensor, ks: tuple, dil: tuple, st: tuple) -> Tensor:
    """``F.unfold`` (``[B, C k_h k_w, T]``); without dilation through strided views and one copy,
    which is much faster than ``im2col`` on CPU."""
    if tuple(dil) != (1, 1):
        return F.unfold(x, ks, dilation=dil, stride=st)
    u = x.unfold(2, ks[0], st[0]).unfold(3, ks[1], st[1])  # [B, C, Ho, Wo, kh, kw]
    B, C, Ho, Wo = u.shape[:4]
    return u.permute(0, 1, 4, 5, 2, 3).reshape(B, C * ks[0] * ks[1], Ho * Wo)


class ConvRule(Rule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, padding mode, dilation, groups)."""

    name = "conv"
    params = ("weight", "bias")

    def valid(self, module, saved, output, dims):
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        return dims.batch_dim == 0 and saved.ndim == spatial + 2 and saved.shape[0] == dims.B

    def factors(self, module, pidx, saved, D, dims, want):
        B, K = dims.B, dims.K
        w, b = _wanted(pidx, "weight", want), _wanted(pidx, "bias", want)
        G = module.groups
        c_out = module.out_channels
        Dt = D.reshape(B, K, G, c_out // G, -1).permute(2, 0, 1, 4, 3)  # [G, B, K, T, p]
        if w is None:
            if b is None:
                return []
            return [PerSample({b: Dt.sum(3).permute(1, 2, 0, 3).reshape(B, K, c_out)})]
        ks, st, dil = module.kernel_size, module.stride, module.dilation
        if isinstance(module, nn.Conv1d):
            x, ks, st, dil = saved.unsqueeze(2), (1, ks[0]), (1, st[0]), (1, dil[0])
            pads = _conv_pads(module, 1) + [0, 0]
        else:
            x, pads = saved, _conv_pads(module, 2)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        call = ConvCall(x, tuple(pads), mode, tuple(ks), tuple(dil), tuple(st), G)
        d = module.in_channels // G * ks[0] * ks[1]
        return [ConvFactor(w, b, (call,), Dt, d)]


class EmbeddingRule(Rule):
    """``nn.Embedding`` (not ``sparse``, not ``scale_grad_by_freq``: those use the fallback)."""

    name = "embedding"
    params = ("weight",)

    def save(self, module, args, output):
        return args[0]

    def valid(self, module, saved, output, dims):
        bd = dims.batch_dim
        return saved.ndim > bd and saved.shape[bd] == dims.B

    def factors(self, module, pidx, saved, D, dims, want):
        B, K = dims.B, dims.K
        w = _wanted(pidx, "weight", want)
        if w is None:
            return []
        idx = saved.movedim(dims.batch_dim, 0).reshape(B, -1)
        Dt = _flat(D, B, K, module.embedding_dim)
        if module.padding_idx is not None:
            Dt = Dt * (idx != module.padding_idx)[:, None, :, None].to(Dt.dtype)
        return [EmbeddingFactor(w, idx, Dt, module.num_embeddings)]


class AffineNormRule(Rule):
    r"""Elementwise affine parameters after a per-sample normalisation, :math:`y = \hat x \odot
    \gamma + \beta`: the hook stores :math:`\hat x` and the per-sample gradients
    :math:`\sum \delta \odot \hat x` and :math:`\sum \delta` are materialised (they are small).
    :math:`\hat x` is recomputed by a norm without affine parameters, except for an eager
    ``LayerNorm`` call, whose autograd node saved the mean and reciprocal deviation it needs
    (:func:`_layer_norm_from_graph`).

    ``LayerNorm`` / ``RMSNorm``: :math:`\gamma` has the normalised shape, sums run over the
    other non-batch dimensions. ``GroupNorm``, ``InstanceNorm*`` and ``BatchNorm*`` in eval mode
    with running statistics: one :math:`\gamma_c` per channel (dimension 1; batch dimension 0).
    ``BatchNorm*`` using batch statistics (training mode, or no running statistics) mixes samples
    (:func:`mixes_samples`) and the engine raises.
    """

    name = "affine_norm"
    params = ("weight", "bias")

    def _channelwise(self, module: nn.Module) -> bool:
        return not isinstance(module, (nn.LayerNorm, _RMSNorm))

    def save(self, module, args, output):
        x = args[0].detach()
        if isinstance(module, nn.LayerNorm):
            lazy = _layer_norm_from_graph(module, x, output)  # computes nothing now
            if lazy is not None:
                return lazy
        with torch.no_grad():
            if isinstance(module, nn.LayerNorm):
                return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            if isinstance(module, _RMSNorm):
                return F.rms_norm(x, module.normalized_shape, None, module.eps)
            if isinstance(module, nn.GroupNorm):
                return F.group_norm(x, module.num_groups, None, None, module.eps)
            if isinstance(module, nn.modules.instancenorm._InstanceNorm):
                stats = module.training or not module.track_running_stats
                rm = None if stats else module.running_mean
                rv = None if stats else module.running_var
                return F.instance_norm(x, rm, rv, None, None, stats, 0.0, module.eps)
            # BatchNorm in eval mode with running statistics (else mixes_samples).
            return F.batch_norm(
                x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
            )

    def valid(self, module, saved, output, dims):
        bd, B = dims.batch_dim, dims.B
        if not self._channelwise(module):
            lead = saved.ndim - len(module.normalized_shape)
            return lead > bd and saved.shape[bd] == B
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            batched = saved.ndim == _instance_ndim(module)
        else:
            batched = saved.ndim >= 2
        return bd == 0 and batched and saved.shape[0] == B

    def factors(self, module, pidx, saved, D, dims, want):
        B, K = dims.B, dims.K
        w, b = _wanted(pidx, "weight", want), _wanted(pidx, "bias", want)
        if isinstance(saved, NormalizedInput):
            saved = saved.form()
        if self._channelwise(module):
            C = saved.shape[1]
            xh = as_dtype(saved.reshape(B, 1, C, -1), D.dtype)
            Dt = D.reshape(B, K, C, -1)
        else:
            n = math.prod(module.normalized_shape)
            xh = as_dtype(saved.movedim(dims.batch_dim, 0).reshape(B, 1, -1, n), D.dtype)
            Dt = D.reshape(B, K, -1, n)
        grads: dict[int, Tensor] = {}
        if w is not None:
            grads[w] = (Dt * xh).sum(2) if not self._channelwise(module) else (Dt * xh).sum(3)
        if b is not None:
            grads[b] = Dt.sum(2) if not self._channelwise(module) else Dt.sum(3)
        return [PerSample(grads)] if grads else []


def _layer_norm_from_graph(
    module: nn.LayerNorm, x: Tensor, output: Tensor
) -> NormalizedInput | None:
    r""":math:`\hat x = (x - \mu)\, r` of an eager ``nn.LayerNorm`` call from the mean
    :math:`\mu` and reciprocal deviation :math:`r` that the call's autograd node saved (two
    element-wise passes, formed later, instead of a second layer norm now); ``None``
    (recompute) unless the output's node is ``F.layer_norm``'s on ``x`` itself, in
    float32/float64, with no saved-tensor hooks. Reads saved tensors (no copies); eager only."""
    if not graph_visible() or saved_tensor_hooks_active():
        return None
    node = output.grad_fn
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    if x.dtype not in (torch.float32, torch.float64):
        return None
    shape = tuple(module.normalized_shape)
    if tuple(node._saved_normalized_shape) != shape:  # type: ignore[attr-defined]
        return None
    saved = node._saved_input  # type: ignore[attr-defined]
    same = (saved.data_ptr(), saved.shape, saved.stride(), saved.dtype)
    if same != (x.data_ptr(), x.shape, x.stride(), x.dtype):
        return None
    mean, rstd = node._saved_result1, node._saved_result2  # type: ignore[attr-defined]
    stats = (*x.shape[: x.ndim - len(shape)], *(1,) * len(shape))
    if tuple(mean.shape) != stats or tuple(rstd.shape) != stats or mean.dtype != x.dtype:
        return None
    return NormalizedInput(x, mean, rstd)


class NormalizedInput:
    r""":math:`\hat x = (x - \mu)\, r` of an eager ``nn.LayerNorm`` call, kept as the call's
    input and saved statistics (:func:`_layer_norm_from_graph`) and formed by
    :meth:`AffineNormRule.factors`, after the engine's backward: the forward pass allocates and
    computes nothing for it, and the rule's factors reuse memory the backward freed (the same
    numbers: the two operations run on the same tensors, only later). An ``x`` modified in
    place meanwhile raises ``ValueError`` (as autograd does for the saved input of a backward
    it runs)."""

    __slots__ = ("x", "mean", "rstd", "version")

    def __init__(self, x: Tensor, mean: Tensor, rstd: Tensor) -> None:
        self.x, self.mean, self.rstd = x, mean, rstd
        self.version = x._version

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def ndim(self) -> int:
        return self.x.ndim

    def form(self) -> Tensor:
        if self.x._version != self.version:
            raise ValueError(
                "The input of an nn.LayerNorm was modified in place after its forward pass; "
                "the engine needs it as it was (as the LayerNorm's own backward does)."
            )
        return (self.x - self.mean) * self.rstd


def _instance_ndim(module: nn.Module) -> int:
    for cls, n in ((nn.InstanceNorm1d, 3), (nn.InstanceNorm2d, 4), (nn.InstanceNorm3d, 5)):
        if isinstance(module, cls):
            return n
    return -1


LINEAR, CONV, EMBEDDING, AFFINE_NORM, GENERIC = (
    LinearRule(),
    ConvRule(),
    EmbeddingRule(),
    AffineNormRule(),
    Rule(),
)


def _plain(module: nn.Module, cls: type[nn.Module], *methods: str) -> bool:
    """``module`` is a ``cls`` that computes what ``cls`` computes: ``forward`` and the helper
    ``methods`` it calls are ``cls``'s (a subclass may override them, e.g. ``_conv_forward``),
    and no instance attribute replaces ``forward``."""
    if not isinstance(module, cls) or "forward" in module.__dict__:
        return False
    kind = type(module)
    return all(getattr(kind, m) is getattr(cls, m) for m in ("forward", *methods))


_NORMS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.LayerNorm, ()),
    (_RMSNorm, ()),
    (nn.GroupNorm, ()),
    (nn.InstanceNorm1d, ("_apply_instance_norm",)),
    (nn.InstanceNorm2d, ("_apply_instance_norm",)),
    (nn.InstanceNorm3d, ("_apply_instance_norm",)),
    (nn.BatchNorm1d, ()),
    (nn.BatchNorm2d, ()),
    (nn.BatchNorm3d, ()),
)


def _type_rule(module: nn.Module) -> Rule:
    if _plain(module, nn.Linear):
        return LINEAR
    if _plain(module, nn.Conv1d, "_conv_forward") or _plain(module, nn.Conv2d, "_conv_forward"):
        return CONV
    if _plain(module, nn.Embedding):
        return GENERIC if module.sparse or module.scale_grad_by_freq else EMBEDDING
    if any(_plain(module, cls, *methods) for cls, methods in _NORMS):
        return AFFINE_NORM
    return GENERIC


def rule_for(module: nn.Module) -> Rule:
    """The rule of ``module`` (:data:`GENERIC`: exact fallback, for anything not listed).

    A rule covers a module only when the module's direct parameters are exactly what the rule
    differentiates: a parametrised module (``torch.nn.utils.parametrize``, the
    ``parametrizations`` versions of ``weight_norm`` / ``spectral_norm``), or one with other
    direct parameters (``prune``'s ``weight_orig``, the old ``weight_norm``'s ``weight_g`` /
    ``weight_v``, the old ``spectral_norm``'s ``weight_orig``), is :data:`GENERIC`. What can
    change after construction (forward pre-hooks, parameters swapped) is checked at every call
    by :func:`exact_call`.
    """
    if parametrize.is_parametrized(module):
        return GENERIC
    rule = _type_rule(module)
    if any(name not in rule.params for name in module._parameters):
        return GENERIC
    return rule


def exact_call(module: nn.Module, cls: type, params: dict[str, object], hook: object) -> bool:
    """Whether a call of ``module`` computes exactly what its rule assumes, checked when the
    call happens (the forward hook ``hook`` runs).

    ``cls`` and ``params`` are the module's class and direct parameters when the rule was
    chosen: a later parametrisation changes the class, a later ``prune`` / ``weight_norm``
    renames the parameters and adds a forward pre-hook. Any forward pre-hook (the module's or a
    global one) may change the inputs or the parameters, and a forward hook that runs before
    ``hook`` (a global one, or one registered earlier on the module) may change the output
    the engine records, unless it is marked ``_jdoptim_passive`` (the engines' own hooks that
    return nothing).
    """
    if type(module) is not cls:
        return False
    own_pre = module._forward_pre_hooks
    if own_pre and any(not _fsdp2_hook(h) for h in own_pre.values()):
        return False
    if _global_pre_hooks():
        return False
    glob = _global_hooks()
    if glob and any(not getattr(h, "_jdoptim_passive", False) for h in glob.values()):
        return False
    for h in module._forward_hooks.values():
        if h is hook:
            break
        if not (getattr(h, "_jdoptim_passive", False) or _fsdp2_hook(h)):
            return False
    current = module._parameters
    if len(current) != len(params):
        return False
    if own_pre:  # only FSDP2's (above)
        # FSDP2 (fully_shard) swaps in the unsharded parameters for the call: same names.
        return all(k in current for k in params)
    for k, v in params.items():  # a loop: cheaper than all() over a generator (every call)
        if current.get(k) is not v:
            return False
    return True


def _fsdp2_hook(hook: object) -> bool:
    """A forward (pre-)hook of FSDP2's ``fully_shard``: it gathers the module's parameters
    before the call and reshards them after it, computing nothing else (jdoptim.distributed)."""
    owner = getattr(hook, "__self__", None)
    if owner is None or type(owner).__name__ != "FSDPState":
        return False
    return type(owner).__module__.startswith("torch.distributed.fsdp")


def _global_pre_hooks() -> dict:
    return nn.modules.module._global_forward_pre_hooks


def _global_hooks() -> dict:
    return nn.modules.module._global_forward_hooks


def mixes_samples(module: nn.Module) -> bool:
    """Whether a call of ``module`` (in its current mode) couples the samples of a batch."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or module.running_mean is None
    return False
