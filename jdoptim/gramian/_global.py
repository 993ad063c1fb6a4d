r"""The engines' side of a global distributed step: their factors, made global.

The engines hand their per-rank ingredients to a :class:`jdoptim.distributed.Communicator`
(the one module that calls ``torch.distributed``) through two helpers:

* :func:`gather_batch`: **per-sample** objectives (the global batch is the concatenation of the
  ranks' batches). Every factor is all-gathered along its sample dimension: for a linear layer
  the inputs ``A`` (``B T d``) and output gradients ``D`` (``B K T p``), for an embedding its
  indices and ``D``, for materialised per-sample gradients ``[B, K, n]`` themselves. Every
  rank then holds the factors of the whole batch, forms the global Gramian with the cross-rank
  blocks and the weighted gradient :math:`\sum_b w_b \nabla L_b` locally: no gradient is
  all-reduced.
* :func:`reduce_mean`: **batch-mean** objectives (objective ``k`` is the mean over ranks of
  the local :math:`L_k`, so :math:`J = \frac1R \sum_r J_r`). A linear factor's positions are
  all-gathered (``T (d + K p)`` numbers) and its output gradients divided by ``R``, or, when
  that is cheaper, its ``[K, p (d + 1)]`` per-objective gradient is materialised and averaged
  (all-reduce); materialised gradients are averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ._layers import Dims, EmbeddingFactor, Factor, LinearFactor, PerSample

if TYPE_CHECKING:
    from ..distributed import Communicator


def gather_batch(
    factors: list[Factor],
    dims: Dims,
    comm: Communicator,
    sizes: list[int] | None,
    extra: tuple[Tensor, int] | None = None,
) -> tuple[list[Factor], Dims, Tensor | None]:
    """Factors of the concatenated batch (``sizes``: every rank's ``B``; ``None``: equal), and
    ``extra = (tensor, dim)`` gathered in the same bucket (``dim`` of size ``B``)."""
    tensors: list[Tensor] = [] if extra is None else [extra[0]]
    where: list[int] = [] if extra is None else [extra[1]]  # dimension of the samples
    for f in factors:
        if isinstance(f, LinearFactor):
            tensors += [f.A, f.D]
            where += [1, 1]
        elif isinstance(f, EmbeddingFactor):
            tensors += [f.idx, f.D]
            where += [0, 0]
        else:
            tensors += list(f.grads.values())
            where += [0] * len(f.grads)
    gathered = iter(comm.gather(tensors, where, sizes))
    glob_extra = None if extra is None else next(gathered)
    out: list[Factor] = []
    for f in factors:
        if isinstance(f, LinearFactor):
            out.append(LinearFactor(f.weight, f.bias, next(gathered), next(gathered)))
        elif isinstance(f, EmbeddingFactor):
            out.append(EmbeddingFactor(f.weight, next(gathered), next(gathered), f.V))
        else:
            out.append(PerSample({i: next(gathered) for i in f.grads}))
    B = sum(sizes) if sizes is not None else dims.B * comm.world_size
    return out, Dims(B=B, K=dims.K, batch_dim=dims.batch_dim, loss_dim=dims.loss_dim), glob_extra


def _ring_cheaper_to_gather(f: LinearFactor, R: int) -> bool:
    """Bytes a rank sends with ring collectives: all-gather ``(R - 1) x local``, all-reduce
    ``2 (R - 1) / R x size``."""
    G, B, K, T, p = f.D.shape
    gather = G * B * T * f.in_features + f.D.numel()  # A's size, without forming a ConvFactor's
    d = f.in_features + (f.bias is not None)
    reduce = G * K * p * d
    return (R - 1) * gather <= 2 * (R - 1) * reduce / R


def reduce_mean(
    factors: list[Factor], extra: list[Tensor], dims: Dims, comm: Communicator
) -> tuple[list[Factor], list[Tensor]]:
    r"""Factors of :math:`J = \frac1R \sum_r J_r` for ``B = 1`` (all positions in ``T``), and
    the mean over ranks of the ``extra`` tensors (e.g. head gradients, the losses)."""
    if dims.B != 1:
        raise ValueError("Batch-mean factors have B = 1.")
    R = comm.world_size
    to_gather: list[Tensor] = []
    where: list[int] = []
    to_reduce: list[Tensor] = list(extra)
    plan: list[str] = []
    pool = PerSample({})
    for f in factors:
        if isinstance(f, LinearFactor) and _ring_cheaper_to_gather(f, R):
            to_gather += [f.A, f.D]
            where += [2, 3]
            plan.append("gather")
        elif isinstance(f, EmbeddingFactor):
            to_gather += [f.idx, f.D]
            where += [1, 2]
            plan.append("gather")
        elif isinstance(f, (LinearFactor, PerSample)):
            grads = f.materialize() if isinstance(f, LinearFactor) else f.grads
            pool.add(grads)
            plan.append("pool")
    keys = list(pool.grads)
    to_reduce += [pool.grads[i] for i in keys]
    reduced = comm.reduce(to_reduce, "avg") if to_reduce else []
    gathered = iter(comm.gather(to_gather, where) if to_gather else [])
    out: list[Factor] = []
    for f, how in zip(factors, plan, strict=True):
        if how != "gather":
            continue
        if isinstance(f, LinearFactor):
            A, D = next(gathered), next(gathered)
            out.append(LinearFactor(f.weight, f.bias, A, D / R))
        else:
            assert isinstance(f, EmbeddingFactor)
            idx, D = next(gathered), next(gathered)
            out.append(EmbeddingFactor(f.weight, idx, D / R, f.V))
    if keys:
        out.append(PerSample(dict(zip(keys, reduced[len(extra) :], strict=True))))
    return out, reduced[: len(extra)]
