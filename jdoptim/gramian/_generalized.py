"""Reshaping a flat ``[M, M]`` Gramian into a generalized Gramian ``[m1..mk, mk..m1]``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def to_generalized_gramian(gramian: Tensor, shape: Sequence[int]) -> Tensor:
    r"""Turn the Gramian of the row-major flattened losses of shape ``[m1, ..., mk]`` into the
    generalized Gramian :math:`\mathcal{G}[a_1..a_k, b_k..b_1] = \langle g_a, g_b \rangle`.

    It is the inverse of :func:`jdoptim.aggregation.flattening.flatten_generalized_gramian`.

    >>> import torch
    >>> G = torch.arange(36.0).reshape(6, 6)
    >>> to_generalized_gramian(G, (2, 3)).shape
    torch.Size([2, 3, 3, 2])
    >>> from jdoptim.aggregation.flattening import flatten_generalized_gramian
    >>> bool((flatten_generalized_gramian(to_generalized_gramian(G, (2, 3))) == G).all())
    True
    """
    shape = tuple(shape)
    k = len(shape)
    if math.prod(shape) != gramian.shape[0]:
        raise ValueError(f"Cannot view a Gramian of shape {tuple(gramian.shape)} as {shape}.")
    return gramian.reshape(*shape, *shape).permute(*range(k), *reversed(range(k, 2 * k)))
