"""pytest-benchmark: UPGradWeighting with the torch solver (eager and compiled) and quadprog.

Run with ``python -m pytest bench/bench_solver.py --benchmark-enable -q`` (1 thread).
"""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import UPGradWeighting

torch.set_num_threads(1)

SIZES = [2, 8, 32, 64, 256]


def _gramian(m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    J = torch.randn(m, 2 * m + 16, generator=g, dtype=torch.float64)
    J[: m // 3] = -J[: m // 3] + 0.5 * J[m // 3 : 2 * (m // 3)]
    return J @ J.T


@pytest.mark.parametrize("m", SIZES)
def test_upgrad_torch_eager(benchmark, m: int) -> None:
    G, weighting = _gramian(m), UPGradWeighting()
    benchmark(weighting, G)


@pytest.mark.parametrize("m", SIZES)
def test_upgrad_torch_compiled(benchmark, m: int) -> None:
    G, weighting = _gramian(m), UPGradWeighting()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    compiled(G)  # compile outside the timed region
    benchmark(compiled, G)


@pytest.mark.parametrize("m", SIZES)
def test_upgrad_quadprog(benchmark, m: int) -> None:
    G, weighting = _gramian(m), UPGradWeighting(solver="quadprog")
    benchmark.pedantic(weighting, args=(G,), rounds=3 if m == 256 else 20, iterations=1)
