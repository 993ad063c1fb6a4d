"""A loop of fixed length that neither syncs nor unrolls.

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

        def cond(i: Tensor, *carry: Tensor) -> Tensor:
            return i < n_iters

        def step(i: Tensor, *carry: Tensor) -> tuple[Tensor, ...]:
            return (i + 1, *body(*carry))

        counter = torch.zeros((), dtype=torch.int64)
        return tuple(while_loop(cond, step, (counter, *init))[1:])
    carry = tuple(init)
    for _ in range(n_iters):
        carry = tuple(body(*carry))
    return carry
