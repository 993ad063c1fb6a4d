"""pytest-benchmark of every Gramian weighting at m in {2, 8, 32, 64, 256}, eager and compiled.

Run: ``python -m pytest bench/bench_weightings.py --benchmark-enable --benchmark-columns=median``
(add ``-k "m64"`` to select). One thread; float32 Gramians of random Jacobians with a conflicting
pair of rows; compiled functions are compiled (and warmed up) before timing.
"""

from __future__ import annotations

import pytest
import torch

import jdoptim.aggregation as agg

WEIGHTINGS = {
    "UPGrad": agg.UPGradWeighting,
    "DualProj": agg.DualProjWeighting,
    "MGDA": agg.MGDAWeighting,
    "IMTLG": agg.IMTLGWeighting,
    "AlignedMTL": agg.AlignedMTLWeighting,
    "Krum": lambda: agg.KrumWeighting(n_byzantine=0),
    "PCGrad": agg.PCGradWeighting,
    "STCH": agg.STCHWeighting,
    "Mean": agg.MeanWeighting,
    "Sum": agg.SumWeighting,
    "Random": agg.RandomWeighting,
    "CAGrad": lambda: agg.CAGradWeighting(c=0.5),
}
SIZES = [2, 8, 32, 64, 256]


def gramian(m: int, n: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g)
    J[0] = -J[-1] + 0.1 * J[0]
    return J @ J.T


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("m", SIZES, ids=lambda m: f"m{m}")
@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_weighting(benchmark, name: str, m: int, mode: str) -> None:
    if name == "Krum" and m < 3:
        pytest.skip("Krum needs m >= n_byzantine + 3")
    torch._dynamo.reset()  # one lambda code object serves every case: no recompile limit
    weighting = WEIGHTINGS[name]()
    G = gramian(m)
    fn = weighting if mode == "eager" else torch.compile(lambda x: weighting(x), fullgraph=True)
    for _ in range(3):
        fn(G)
    benchmark.group = f"m={m}"
    benchmark(fn, G)
