"""UPGradWeighting: the exact torch solver (eager, compiled), the former MPRGP and quadprog.

Every timed call gets a *different* Gramian (cycling through 4 of the ``aligned_conflict`` kind,
so that no warm start or cache flatters a solver). Prints one row per m: median times (ms), the
compile time of the compiled call, and the largest weight error relative to max|w| against
quadprog over the hard families of the tests (Pareto-stationary strong/weak, duplicated and
opposite rows, rank-deficient, random; and the solver bank), for the torch solver and for
MPRGP.

    python bench/solver_vs_quadprog.py [m ...]          (default: 8 64 256)
    python bench/solver_vs_quadprog.py --no-quadprog 1000
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdoptim.aggregation import UPGradWeighting  # noqa: E402
from tests.solvers.bank import FAMILIES, KINDS, make_family, make_jacobian  # noqa: E402

torch.set_num_threads(1)
from jdoptim.solvers import dual_cone  # noqa: E402

# The steady state of a long run: the compiled pivoting of m <= 32 from the first call (a
# process normally runs the eager one for its first PADDED_PIVOT_AFTER_CALLS calls).
dual_cone.PADDED_PIVOT_AFTER_CALLS = 0


def median_ms(fn, Gs: list[torch.Tensor], reps: int) -> float:
    fn(Gs[-1])
    times = []
    for i in range(reps):
        G = Gs[i % len(Gs)]
        start = time.perf_counter()
        fn(G)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def gramians(m: int) -> list[torch.Tensor]:
    return [(lambda J: J @ J.T)(make_jacobian("aligned_conflict", m, seed=s)) for s in range(4)]


def max_errors(m: int, weightings: list, reference) -> list[float]:
    errs = [0.0] * len(weightings)
    cases = [make_family(f, m, max(2, m // 2), seed=1) for f in FAMILIES]
    cases += [make_jacobian(kind, m, seed=1) for kind in KINDS]
    for J in cases:
        G = J @ J.T
        w_ref = reference(G)
        for i, weighting in enumerate(weightings):
            err = ((weighting(G) - w_ref).abs().max() / w_ref.abs().max()).item()
            errs[i] = max(errs[i], err)
    return errs


def main(sizes: list[int], quadprog: bool) -> None:
    print(
        f"{'m':>5} {'torch eager':>11} {'torch comp':>10} {'mprgp eager':>11} "
        f"{'quadprog':>9} {'compile s':>9} {'err torch':>9} {'err mprgp':>9}"
    )
    exact, old = UPGradWeighting(), UPGradWeighting(solver="mprgp")
    qp = UPGradWeighting(solver="quadprog")
    for m in sizes:
        Gs = gramians(m)
        reps = 3 if m >= 512 else (8 if m >= 128 else 30)
        t_eager = median_ms(exact, Gs, reps)
        torch._dynamo.reset()
        compiled = torch.compile(lambda G: exact(G), fullgraph=True)
        start = time.perf_counter()
        compiled(Gs[0])
        t_compile = time.perf_counter() - start
        t_comp = median_ms(compiled, Gs, reps)
        t_old = median_ms(old, Gs, reps) if m <= 256 else float("nan")
        t_qp = median_ms(qp, Gs, 3 if m >= 128 else reps) if quadprog else float("nan")
        nan = float("nan")
        err, err_old = max_errors(m, [exact, old], qp) if quadprog else (nan, nan)
        print(
            f"{m:>5} {t_eager:>11.2f} {t_comp:>10.2f} {t_old:>11.2f} {t_qp:>9.2f} "
            f"{t_compile:>9.1f} {err:>9.1e} {err_old:>9.1e}",
            flush=True,
        )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main([int(a) for a in args] or [8, 64, 256], quadprog="--no-quadprog" not in sys.argv)
