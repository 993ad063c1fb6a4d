"""UPGradWeighting on W2's per-sample Gramians: the exact solver against the former MPRGP.

Cycles 4 Gramians (4 seeds of W2, float64), so warm starts do not flatter either solver, and
prints the median time per call of each solver in the same run (1 torch thread)::

    python bench/solver_on_w2.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from workloads import make

from jdoptim.aggregation import UPGradWeighting


def per_sample_gramians(batch: int, n: int = 4) -> list[torch.Tensor]:
    gramians = []
    for seed in range(n):
        w = make("W2", batch, seed=seed)
        params = {k: v.detach() for k, v in w.model.named_parameters()}

        def loss(p, x, y, model=w.model):
            return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, w.x, w.y)
        J = torch.cat([v.reshape(batch, -1) for v in g.values()], 1).double()
        gramians.append(J @ J.T)
    return gramians


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; median ms per UPGradWeighting call")
    for batch in (64, 256):
        gramians = per_sample_gramians(batch)
        row = []
        for solver in ("torch", "mprgp"):
            weighting = UPGradWeighting(solver=solver)
            for G in gramians:  # warm-up (the solvers' one-time kernel compilation)
                weighting(G)
            times = []
            for _ in range(3):
                for G in gramians:
                    start = time.perf_counter()
                    weighting(G)
                    times.append(1e3 * (time.perf_counter() - start))
            row.append(f"{solver} {statistics.median(times):.2f}")
        print(f"W2 B={batch}: " + ", ".join(row))


if __name__ == "__main__":
    main()
