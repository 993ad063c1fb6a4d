"""A bank of Gramians for the dual-cone solver tests and benchmarks.

Kinds: ``random`` (Gaussian rows), ``lowrank`` (rank m/4), ``rank2``, ``conflict`` (a shared
direction with random signs plus small noise), ``conflict_lowdim`` (5-dimensional rows plus tiny
noise) and ``aligned_conflict`` (a shared direction with a third of the rows flipped). After trace
normalisation and the 1e-4 ridge, their condition numbers range from ~20 to ~1e4.
"""

from __future__ import annotations

import torch

KINDS = ("random", "lowrank", "rank2", "conflict", "conflict_lowdim", "aligned_conflict")


def make_jacobian(kind: str, m: int, seed: int = 0, n: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = n if n is not None else max(2 * m, 16)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "random":
        return randn(m, n)
    if kind == "lowrank":
        r = max(1, m // 4)
        return randn(m, r) @ randn(r, n)
    if kind == "rank2":
        return randn(m, 2) @ randn(2, n)
    if kind == "conflict":
        signs = torch.randint(0, 2, (m, 1), generator=g).double() * 2 - 1
        return signs * randn(n) + 0.05 * randn(m, n)
    if kind == "conflict_lowdim":
        return randn(m, 5) @ randn(5, n) + 1e-3 * randn(m, n)
    if kind == "aligned_conflict":
        J = randn(n) + 0.5 * randn(m, n)
        J[: m // 3] *= -1
        return J
    raise ValueError(kind)


FAMILIES = ("strong", "weak", "duplicated", "opposite", "rank_deficient", "random")
"""Jacobian families of the exact solver's tests (:func:`make_family`)."""


def make_family(family: str, m: int, n: int, seed: int, permute: bool = True) -> torch.Tensor:
    """An ``[m, n]`` float64 Jacobian of a hard family, rows in a random order if ``permute``.

    ``strong``: Pareto-stationary, ``sum_i a_i g_i = 0`` with every ``a_i > 0``; ``weak``: the
    same with about half of the ``a_i`` zero; ``duplicated`` / ``opposite``: random rows, about
    a third of them copies / exact negatives of others; ``rank_deficient``: rank
    ``max(1, m // 3)``; ``random``: Gaussian rows.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    J = randn(m, n)
    if family in ("strong", "weak"):
        a = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
        if family == "weak":
            a = torch.where(torch.rand(m, generator=g, dtype=torch.float64) < 0.5, 0.0, a)
            a[0] = 1.0  # at least one positive coefficient
        a = a / a.norm()
        J = J - a[:, None] * (a @ J)[None]
    elif family in ("duplicated", "opposite"):
        sign = 1.0 if family == "duplicated" else -1.0
        for i in range(m // 3):
            j = int(torch.randint(0, m, (1,), generator=g))
            if j != i:
                J[j] = sign * J[i]
    elif family == "rank_deficient":
        r = max(1, m // 3)
        J = randn(m, r) @ randn(r, n)
    elif family != "random":
        raise ValueError(family)
    if permute:
        J = J[torch.randperm(m, generator=g)]
    return J
