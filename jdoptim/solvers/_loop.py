"""Loops of bounded length that neither sync nor unroll.

Eagerly it is a plain Python ``for`` loop (no host-device synchronisation: the trip count is a
Python int). Under ``torch.compile`` it becomes one ``while_loop`` higher-order op whose counter
is a CPU scalar, so the generated code holds the body once, whatever the trip count (an unrolled
100-iteration loop costs ~18 s of compile time and slows the compiled step down; see
``shared/research``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._higher_order_ops import while_loop

Body = Callable[..., Sequence[Tensor]]


def fixed_loop(n_iters: int, body: Body, init: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Apply ``carry = body(*carry)`` exactly ``n_iters`` times and return the final carry.

    ``body`` must return tensors of the same shapes and dtypes as its inputs.

    >>> import torch
    >>> fixed_loop(3, lambda x: (2 * x,), (torch.ones(2),))
    (tensor([8., 8.]),)
    """
    if n_iters <= 0:
        return tuple(init)
    if torch.compiler.is_compiling():
        return _while_loop(n_iters, body, init, done_index=None)
    carry = tuple(init)
    for _ in range(n_iters):
        carry = tuple(body(*carry))
    return carry


def _while_loop(
    n_iters: int, body: Body, init: Sequence[Tensor], *, done_index: int | None
) -> tuple[Tensor, ...]:
    # The trip count is a tensor, not a closed-over int: when ``n_iters`` derives from a dynamic
    # (symbolic) shape, an int closure fails in Inductor's subgraph update.
    limit = torch.full((), n_iters, dtype=torch.int64)

    def cond(i: Tensor, *carry: Tensor) -> Tensor:
        if done_index is None:
            return i < limit
        return (i < limit) & ~carry[done_index]

    def step(i: Tensor, *carry: Tensor) -> tuple[Tensor, ...]:
        return (i + 1, *body(*carry))

    counter = torch.zeros((), dtype=torch.int64)
    return tuple(while_loop(cond, step, (counter, *init))[1:])


def bounded_loop(
    n_iters: int, body: Body, init: Sequence[Tensor], *, done_index: int
) -> tuple[Tensor, ...]:
    """Like :func:`fixed_loop`, but stops early once ``carry[done_index]`` (a 0-d bool tensor that
    ``body`` maintains) is true, **on the CPU only**.

    Reading the flag is free on the CPU; on an accelerator it would be a host-device
    synchronisation per iteration, so there the loop runs all ``n_iters`` iterations (the body
    must therefore leave a converged carry unchanged, or nearly so). Eagerly the flag is read
    after every iteration; under ``torch.compile`` it is part of the ``while_loop`` predicate.

    >>> import torch
    >>> def halve(x, done):
    ...     x = x / 2
    ...     return x, x.amax() < 1
    >>> bounded_loop(100, halve, (torch.tensor([8.0]), torch.tensor(False)), done_index=1)
    (tensor([0.5000]), tensor(True))
    """
    if init[done_index].device.type != "cpu":
        return fixed_loop(n_iters, body, init)
    if n_iters <= 0:
        return tuple(init)
    if torch.compiler.is_compiling():
        return _while_loop(n_iters, body, init, done_index=done_index)
    carry = tuple(init)
    for _ in range(n_iters):
        if bool(carry[done_index]):
            break
        carry = tuple(body(*carry))
    return carry
