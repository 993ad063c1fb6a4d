"""Batched vector-Jacobian products in chunks: the backward pass the engines share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def chunked_batched_grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    chunk_size: int | None,
    *,
    retain_graph: bool,
) -> list[Tensor | None]:
    """Gradients of ``inputs`` for each of the ``M`` rows of ``cotangents`` at ``outputs``.

    ``cotangents[j]`` is ``[M, *outputs[j].shape]``; the result holds ``[M, *input.shape]`` per
    input (``None`` where no output reaches it: that is structural, the same for every row).
    One backward batched over the ``M`` rows (``is_grads_batched``) when ``chunk_size`` is
    ``None``; otherwise ``ceil(M / chunk_size)`` of them, each holding at most ``chunk_size``
    copies of the intermediate gradients (``chunk_size=1``: plain backward passes, no ``vmap``).
    The graph is kept between chunks, and after the last one iff ``retain_graph``.

    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> y = x**2
    >>> chunked_batched_grad([y], [x], [torch.eye(2)], 1, retain_graph=False)
    [tensor([[2., 0.],
            [0., 4.]])]
    """
    m = cotangents[0].shape[0]
    chunk = m if chunk_size is None else min(chunk_size, m)
    starts = range(0, m, chunk)
    pieces: list[tuple[Tensor | None, ...]] = []
    for n, start in enumerate(starts):
        rows = [c[start : start + chunk] for c in cotangents]
        keep = retain_graph or n < len(starts) - 1
        if chunk == 1:
            grads = torch.autograd.grad(
                outputs, inputs, grad_outputs=[r[0] for r in rows], retain_graph=keep,
                allow_unused=True,
            )  # fmt: skip
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        else:
            grads = torch.autograd.grad(
                outputs, inputs, grad_outputs=rows, retain_graph=keep, allow_unused=True,
                is_grads_batched=True,
            )  # fmt: skip
        pieces.append(grads)
    if len(pieces) == 1:
        return list(pieces[0])
    return [None if piece[0] is None else torch.cat(piece) for piece in zip(*pieces, strict=True)]
