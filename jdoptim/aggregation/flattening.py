"""Flattening: a generalized weighting built from an ordinary Gramian weighting."""

from __future__ import annotations

import math

from torch import Tensor

from ._base import GeneralizedWeighting, Weighting


def flatten_generalized_gramian(generalized_gramian: Tensor) -> Tensor:
    r"""Reshape a generalized Gramian ``[m1..mk, mk..m1]`` into the ``[M, M]`` Gramian of the
    flattened objectives (``M = m1 * ... * mk``, row-major order).

    >>> import torch
    >>> t = torch.arange(12.0).reshape(2, 3, 2)
    >>> gg = torch.einsum("abi,dci->abcd", t, t)  # [2, 3, 3, 2]
    >>> bool((flatten_generalized_gramian(gg) == t.reshape(6, 2) @ t.reshape(6, 2).T).all())
    True
    """
    k = generalized_gramian.ndim // 2
    shape = generalized_gramian.shape[:k]
    size = math.prod(shape)
    reordered = generalized_gramian.permute(*range(k), *reversed(range(k, 2 * k)))
    return reordered.reshape(size, size)


class Flattening(GeneralizedWeighting):
    r"""Apply a Gramian :class:`Weighting` to the flattened generalized Gramian and reshape the
    weights back: :math:`W = \mathrm{reshape}(w(\mathrm{flat}(\mathcal{G})), [m_1, \dots, m_k])`.

    :param weighting: the weighting applied to the ``[M, M]`` flattened Gramian.

    >>> import torch
    >>> from jdoptim.aggregation import UPGradWeighting
    >>> Flattening(UPGradWeighting())(torch.ones((2, 3, 3, 2)))
    tensor([[0.1667, 0.1667, 0.1667],
            [0.1667, 0.1667, 0.1667]])
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        shape = generalized_gramian.shape[: generalized_gramian.ndim // 2]
        return self.weighting(flatten_generalized_gramian(generalized_gramian)).reshape(shape)
