r"""The Jacobian engine: batched vector-Jacobian products, then :math:`G = \sum_p J_p J_p^\top`.

For ``M`` losses :math:`L \in \mathbb{R}^M` and parameters :math:`\theta_1..\theta_P`, one
reverse pass batched over the ``M`` rows of the identity (``torch.autograd.grad`` with
``is_grads_batched=True``, i.e. ``vmap`` over autograd) gives every block
:math:`J_p = \partial L / \partial \theta_p \in \mathbb{R}^{M \times n_p}`. The Gramian is
accumulated block by block in float32 or wider (:func:`~jdoptim.gramian.accumulate_gram`),
and the weighted gradient is read off the same blocks, :math:`\nabla_p = J_p^\top w`: no
second backward.

Memory: the Jacobian itself (``M x n``) is held until the weighted gradient is built. The
batched backward also holds ``M`` copies of every intermediate gradient; ``chunk_size = c``
bounds that to ``c`` copies by running ``ceil(M / c)`` batched passes (a Python loop of static
length; under ``torch.compile`` it is unrolled, so keep the number of chunks small there).
``chunk_size=1`` runs ``M`` plain backward passes with no ``vmap`` at all, the fallback for
models that ``vmap`` cannot go through (e.g. some RNN kernels, or a model compiled on its own
while JD runs eagerly: pytorch#138422).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._base import GramianEngine, GramianResult
from ._kernels import accumulate_gram, accumulation_dtype
from ._scale import exponent, gram_shift, pow2
from ._vjp import chunked_batched_grad

if TYPE_CHECKING:
    from ..distributed import Communicator


class JacobianResult(GramianResult):
    """Per-parameter Jacobians ``[M, *p.shape]`` (``None`` where unreached) and their Gramian.

    ``loss_shift`` (an int 0-d tensor ``s``, see :class:`JacobianEngine`): the given Jacobians
    are those of the losses scaled by ``2**-s``; the Gramian, :attr:`jacobians`, the Jacobian and
    the weighted gradients are those of the losses themselves.
    """

    materialized = True

    def __init__(
        self,
        params: Sequence[Tensor],
        jacobians: Sequence[Tensor | None],
        m: int,
        device: torch.device | None = None,
        *,
        loss_shift: Tensor | None = None,
    ) -> None:
        self.params = list(params)
        self._jacobians = list(jacobians)
        blocks = [j.reshape(m, -1) for j in self._jacobians if j is not None]
        self._blocks = blocks
        dtype = accumulation_dtype(*(b.dtype for b in blocks))
        device = blocks[0].device if blocks else device
        self._dtype = dtype
        if loss_shift is None:
            loss_shift = torch.zeros((), dtype=torch.int32, device=device)
        self._loss_shift = loss_shift.to(device=device, dtype=torch.int32)
        gramian = torch.zeros(m, m, dtype=dtype, device=device)
        for block in blocks:
            gramian = accumulate_gram(gramian, block)
        # Back to the losses' own scale, unless that Gramian is not representable: then a
        # power of two from its largest diagonal entry (see jdoptim.gramian._scale).
        top = exponent(gramian.diagonal())  # 2**(top-1) <= max_i |g_i|^2 (of 2**-s L)
        grad_exp = self._loss_shift + torch.div(top + 1, 2, rounding_mode="floor")
        shift = gram_shift([grad_exp], dtype, gramian.device)
        c = pow2(self._loss_shift - shift, dtype)
        self.gramian = (gramian * c) * c
        self.gramian_exponent = 2 * shift

    @property
    def jacobians(self) -> list[Tensor | None]:
        """The per-parameter Jacobians of the losses (``None`` where unreached)."""
        c = pow2(self._loss_shift, self._dtype)
        return [None if j is None else j * c.to(j.dtype) for j in self._jacobians]

    def weighted_gradient(self, weights: Tensor) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for p, jac in zip(self.params, self._jacobians, strict=True):
            if jac is None:
                out.append(None)
                continue
            dtype = accumulation_dtype(jac.dtype, weights.dtype)
            # w^T J = (2^s w)^T (2^-s J): a power of two, so exactly.
            w = weights.to(dtype) * pow2(self._loss_shift, dtype)
            flat = w @ jac.reshape(jac.shape[0], -1).to(dtype)
            out.append(flat.reshape(p.shape).to(p.dtype))
        return out

    def to_global(
        self,
        comm: Communicator,
        losses: Tensor,
        batch_dim: int | None,
        sizes: list[int] | None,
    ) -> tuple[JacobianResult, Tensor]:
        """Batch-mean: all-reduce (mean) every block, ``M n`` numbers. Per-sample: all-gather
        the rows along ``batch_dim``. One bucket with the losses either way."""
        losses = losses.detach()
        present = [j for j in self.jacobians if j is not None]
        if batch_dim is None:
            reduced = comm.reduce([losses, *present], "avg")
            glob, blocks = reduced[0], iter(reduced[1:])
            shapes = [None if j is None else j.shape for j in self.jacobians]
        else:
            rows = [j.reshape(*losses.shape, -1) for j in present]
            gathered = comm.gather([losses, *rows], [batch_dim] * (1 + len(rows)), sizes)
            glob, blocks = gathered[0], iter(gathered[1:])
            shapes = [None if j is None else (glob.numel(), *p.shape)
                      for p, j in zip(self.params, self.jacobians, strict=True)]  # fmt: skip
        jacs = [None if s is None else next(blocks).reshape(s) for s in shapes]
        return JacobianResult(self.params, jacs, glob.numel(), losses.device), glob

    def to_shards(
        self, comm: Communicator, losses: Tensor, shards: Sequence[Tensor]
    ) -> tuple[ShardedJacobianResult, Tensor]:
        r"""Batch-mean objectives over dim-0 sharded parameters (FSDP2, ``shards`` the DTensor
        parameters of ``self.params``): the per-shard Gramians add up exactly, since the
        columns of :math:`J` split over the shards. Reduce-scatter (mean) every block so each
        rank keeps its rows of :math:`J = \frac1R \sum_r J_r` (``m n`` numbers, of which a
        ring sends :math:`\frac{R-1}{R}`, half an all-reduce), form the partial Gramian, and
        all-reduce the ``[m, m]`` sum; :math:`J_{\text{shard}}^\top w` is this rank's shard of
        the weighted gradient."""
        R = comm.world_size
        m = losses.numel()
        padded: list[Tensor] = []
        for jac in self.jacobians:
            if jac is None:
                raise ValueError("Every sharded parameter must be reached by the losses.")
            rows = jac.movedim(1, 0) if jac.ndim > 1 else jac.reshape(m, 1).movedim(1, 0)
            c = -(-rows.shape[0] // R)
            if rows.shape[0] != R * c:
                rows = torch.cat([rows, rows.new_zeros(R * c - rows.shape[0], *rows.shape[1:])])
            padded.append(rows)
        mine = comm.reduce_scatter(padded)
        blocks: list[Tensor] = []
        for piece, shard in zip(mine, shards, strict=True):
            local = shard.to_local()  # type: ignore[attr-defined]
            rows = local.shape[0] if local.ndim else 1
            blocks.append((piece[:rows] / R).movedim(0, 1).reshape(m, -1))
        dtype = accumulation_dtype(*(b.dtype for b in blocks))
        device = losses.device
        # One shift for every rank: the scaled partial Gramians must add up.
        e = torch.stack([exponent(b) for b in blocks]).amax() if blocks else None
        shift = gram_shift([] if e is None else [comm.max(e)], dtype, device)
        scale = pow2(-shift, dtype)
        partial = torch.zeros(m, m, dtype=dtype, device=device)
        for block in blocks:
            partial = accumulate_gram(partial, block * scale.to(block.dtype))
        summed, glob = comm.reduce([partial, losses.detach().reshape(-1)], "sum")
        result = ShardedJacobianResult(list(shards), blocks, summed, m)
        result.gramian_exponent = 2 * shift
        return result, (glob / R).reshape(losses.shape)

    def jacobian(self) -> Tensor:
        if not self._blocks:
            raise ValueError("No loss depends on the parameters: the Jacobian is empty.")
        dtype = self._blocks[0].dtype
        for b in self._blocks[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        c = pow2(self._loss_shift, self._dtype).to(dtype)
        return torch.cat([b.to(dtype) for b in self._blocks], dim=1) * c

    def split(self, vector: Tensor) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        start = 0
        for p, jac in zip(self.params, self._jacobians, strict=True):
            if jac is None:
                out.append(None)
                continue
            n = p.numel()
            out.append(vector[start : start + n].reshape(p.shape).to(p.dtype))
            start += n
        return out


class ShardedJacobianResult(GramianResult):
    """The global Gramian of batch-mean losses and this rank's columns of :math:`J` (FSDP2)."""

    def __init__(self, shards: list[Tensor], blocks: list[Tensor], gramian: Tensor, m: int):
        self.shards, self.blocks, self.gramian, self.m = shards, blocks, gramian, m

    def weighted_gradient(self, weights: Tensor) -> list[Tensor | None]:
        from torch.distributed.tensor import DTensor

        out: list[Tensor | None] = []
        for p, block in zip(self.shards, self.blocks, strict=True):
            local = p.to_local()  # type: ignore[attr-defined]
            dtype = accumulation_dtype(block.dtype, weights.dtype)
            g = (weights.to(dtype) @ block.to(dtype)).reshape(local.shape).to(p.dtype)
            out.append(
                DTensor.from_local(
                    g,
                    p.device_mesh,
                    p.placements,
                    shape=p.shape,
                    stride=p.stride(),  # type: ignore[attr-defined]
                )
            )
        return out


def _explain_compiled_backward_error(error: RuntimeError) -> None:
    """Re-raise the known failures of a separately compiled model's backward with guidance."""
    message = str(error)
    if "data pointer" in message or "donated buffer" in message:
        raise RuntimeError(
            "The Jacobian engine could not back-propagate through a compiled model's backward "
            "from outside the compiled region (pytorch#138422). Compile the whole train step "
            "(forward, losses and opt.step/opt.backward) in one torch.compile, or use "
            "chunk_size=1 with torch._functorch.config.donated_buffer = False."
        ) from error


class JacobianEngine(GramianEngine):
    r"""Materialise the Jacobian with batched vector-Jacobian products.

    :param chunk_size: number of Jacobian rows per backward pass. ``None`` (default) does all
        ``M`` rows in one batched pass; ``c >= 2`` bounds the memory of the batched backward;
        ``1`` avoids ``vmap`` (``M`` plain backward passes).

    **Scale.** Losses of size :math:`|L| \ge 2^{32}` (float32 Gramian) are differentiated as
    :math:`2^{-s} L` with the smallest integer :math:`s` bringing them below :math:`2^{32}`:
    the cotangents of the batched backward are :math:`2^{-s} I`, which costs nothing, and the
    Jacobian, its Gramian and the weighted gradient are scaled back exactly (powers of two).
    So JD on :math:`2^k L` equals :math:`2^k` times JD on :math:`L` for every :math:`k` that
    keeps the plain gradient finite (unless the gradients exceed the losses by a factor above
    about :math:`2^{32}/\sqrt{n}`). The Gramian handed to the weighting is :math:`G` itself
    unless :math:`G` is not representable, then :math:`2^{-e} G` (``gramian_exponent``, see
    :mod:`jdoptim.gramian._scale`). Tiny losses are not scaled up: a Gramian of gradients
    below about :math:`2^{-63}` underflows as before (the layer-wise and multi-task engines
    scale their factors by the gradients themselves and handle both ends).

    >>> import torch
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> losses = torch.stack([x.sum(), (x**2).sum()])  # J = [[1, 1], [2, 4]]
    >>> JacobianEngine().compute(losses, [x]).gramian
    tensor([[ 2.,  6.],
            [ 6., 20.]])
    """

    name = "jacobian"
    materializes_jacobian = True

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` should be None or an int >= 1, but got {chunk_size!r}.")
        self.chunk_size = chunk_size

    def compute(
        self, losses: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
    ) -> JacobianResult:
        if losses.ndim != 1:
            raise ValueError(f"`losses` should be a flat vector, got shape {tuple(losses.shape)}.")
        m = losses.shape[0]
        params = list(params)
        # Huge losses (|L| >= 2^E) are differentiated as 2^-s L: their Jacobian, and its
        # Gramian, then cannot overflow (see the class docstring).
        shift = gram_shift([exponent(losses)], torch.float32, losses.device).clamp(min=0)
        eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
        eye = eye * pow2(-shift, losses.dtype)
        try:
            jacobians = chunked_batched_grad(
                [losses], params, [eye], self.chunk_size, retain_graph=retain_graph
            )
        except RuntimeError as error:
            _explain_compiled_backward_error(error)
            raise
        return JacobianResult(params, jacobians, m, losses.device, loss_shift=shift)

    def __repr__(self) -> str:
        return f"JacobianEngine(chunk_size={self.chunk_size})"
