"""UPGradWeighting (exact default solver, eager) on the Gramian families of the test bank.

For each ``KIND:M`` argument, cycles 3 Gramians of that kind (``tests/solvers/bank.py``, seeds
0-2) after one warm-up call, and prints the median and the minimum ms per call (1 torch thread)::

    python bench/solver_families.py random:256 aligned_conflict:256 random:1000
    python bench/solver_families.py --reps 3 aligned_conflict:1000

Run it on two checkouts one after the other to compare them.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdoptim.aggregation import UPGradWeighting  # noqa: E402
from tests.solvers.bank import make_jacobian  # noqa: E402

torch.set_num_threads(1)


def main(specs: list[str], reps: int | None) -> None:
    weighting = UPGradWeighting()
    print(f"torch {torch.__version__}, 1 thread; ms per UPGradWeighting call")
    for spec in specs:
        kind, m_text = spec.split(":")
        m = int(m_text)
        gramians = [(lambda J: J @ J.T)(make_jacobian(kind, m, seed=s)) for s in range(3)]
        n = reps if reps is not None else (3 if m >= 512 else (9 if m >= 128 else 30))
        weighting(gramians[-1])
        times = []
        for i in range(n):
            start = time.perf_counter()
            weighting(gramians[i % 3])
            times.append(time.perf_counter() - start)
        median, best = 1e3 * statistics.median(times), 1e3 * min(times)
        print(f"{kind:>17} m={m:<5} median {median:9.1f}  min {best:9.1f}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    reps = None
    if "--reps" in args:
        i = args.index("--reps")
        reps = int(args[i + 1])
        del args[i : i + 2]
    main(args, reps)
