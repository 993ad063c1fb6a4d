"""Why the QP sets the cost of a per-sample (IWRM) step: the structure of UPGrad's problems on W2.

Run: ``python bench/qp_structure.py``. For the W2 workload (MLP, per-sample cross-entropy) at
batch sizes 16 / 64 / 256 it builds the Gramian with the layer-wise engine and UPGrad's
normalised, regularised matrix :math:`\\hat G`, solves the ``m`` dual-cone QPs exactly with
quadprog, and prints

* the share of negative Gramian entries (conflicting pairs of samples);
* the size of the free set at the solution (coordinates strictly above their bound): UPGrad's
  QPs on these Gramians are mostly *interior*;
* the condition number :math:`\\kappa` of :math:`\\hat G` and the number of conjugate-gradient
  iterations that reduce the error by :math:`10^{-10}` in the worst case,
  :math:`\\tfrac12\\sqrt\\kappa \\ln(2 / 10^{-10})`;
* the iterations the batched MPRGP solver needs to match quadprog to 1e-7, and the time of one
  ``[m, m] @ [m, m]`` float64 product (each iteration spends one).

One thread, float64, the solvers' eager loops (no compilation), so that iteration counts are
exact.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as W  # noqa: E402

from jdoptim.aggregation._gramian import normalize, regularize  # noqa: E402
from jdoptim.gramian import LayerwiseGramianEngine  # noqa: E402
from jdoptim.solvers import set_eager_compilation  # noqa: E402
from jdoptim.solvers.dual_cone import _quadprog_solve  # noqa: E402
from jdoptim.solvers.mprgp import mprgp_solve  # noqa: E402


def iterations_to_match(g_hat: torch.Tensor, exact: torch.Tensor, tol: float = 1e-7) -> int:
    lower = torch.eye(g_hat.shape[0], dtype=torch.float64)
    for n in [*range(2, 40, 2), *range(40, 1000, 10)]:
        if (mprgp_solve(g_hat, lower, n) - exact).abs().max() < tol:
            return n
    return -1


def main() -> None:
    torch.set_num_threads(1)
    set_eager_compilation(False)
    print(
        f"{'batch':>6}{'G<0':>7}{'free set (mean/min/max)':>26}{'kappa':>9}{'CG bound':>10}"
        f"{'MPRGP iters':>13}{'matmul ms':>11}"
    )
    for batch in (16, 64, 256):
        w = W.make("W2", batch)
        engine = LayerwiseGramianEngine(w.model)
        losses = w.losses(w.model, w.x, w.y)
        G = engine.compute(losses, list(w.model.parameters())).gramian.double()
        engine.remove()
        g_hat = regularize(normalize(G, 1e-4), 1e-4).double()
        lower = torch.eye(batch, dtype=torch.float64)
        exact = _quadprog_solve(g_hat, lower)
        free = (exact - lower > 1e-9).sum(1).double()
        eig = torch.linalg.eigvalsh(g_hat)
        kappa = (eig.max() / eig.min()).item()
        cg_bound = math.ceil(0.5 * math.sqrt(kappa) * math.log(2 / 1e-10))
        iters = iterations_to_match(g_hat, exact)
        a = torch.randn(batch, batch, dtype=torch.float64)
        for _ in range(3):
            a @ g_hat
        t0 = time.perf_counter()
        for _ in range(20):
            a @ g_hat
        matmul = (time.perf_counter() - t0) / 20 * 1e3
        stats = f"{free.mean():.0f} / {free.min():.0f} / {free.max():.0f} of {batch}"
        print(
            f"{batch:>6}{(G < 0).double().mean():>7.0%}{stats:>26}{kappa:>9.1f}{cg_bound:>10}"
            f"{iters:>13}{matmul:>11.3f}"
        )


if __name__ == "__main__":
    main()
