"""UPGradWeighting: the torch solver (eager, compiled) against quadprog, speed and accuracy.

Prints one row per m: median times (ms), the speed-up over quadprog, the compile time and the
largest weight error relative to max(1, |w|) over the solver bank of the tests.

    python bench/solver_vs_quadprog.py [m ...]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdoptim.aggregation import UPGradWeighting  # noqa: E402
from tests.solvers.bank import KINDS, make_jacobian  # noqa: E402

torch.set_num_threads(1)


def median_ms(fn, G: torch.Tensor, reps: int) -> float:
    fn(G)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(G)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(sizes: list[int]) -> None:
    print(
        f"{'m':>4} {'eager ms':>9} {'compiled ms':>11} {'quadprog ms':>11} {'qp/eager':>8} "
        f"{'qp/comp':>8} {'compile s':>9} {'max err':>8}"
    )
    eager, qp = UPGradWeighting(), UPGradWeighting(solver="quadprog")
    for m in sizes:
        J = make_jacobian("aligned_conflict", m, seed=0)
        G = J @ J.T
        reps = 5 if m >= 128 else 30
        t_eager = median_ms(eager, G, reps)
        torch._dynamo.reset()
        compiled = torch.compile(lambda G: eager(G), fullgraph=True)
        start = time.perf_counter()
        compiled(G)
        t_compile = time.perf_counter() - start
        t_comp = median_ms(compiled, G, reps)
        t_qp = median_ms(qp, G, 3 if m >= 128 else reps)
        err = 0.0
        for kind in KINDS:
            Jk = make_jacobian(kind, m, seed=1)
            Gk = Jk @ Jk.T
            w, w_ref = eager(Gk), qp(Gk)
            err = max(err, ((w - w_ref).abs().max() / w_ref.abs().max().clamp(min=1)).item())
        print(
            f"{m:>4} {t_eager:>9.2f} {t_comp:>11.2f} {t_qp:>11.2f} {t_qp / t_eager:>8.1f} "
            f"{t_qp / t_comp:>8.1f} {t_compile:>9.1f} {err:>8.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2, 8, 32, 64, 256])
