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
