"""Peak extra memory of a JD step on the standard workloads, jdoptim against torchjd.

Run: ``python bench/bench_memory.py``. Each (workload, variant) runs in a fresh process: it
builds the workload, takes one plain SGD step (so the allocator, the autograd buffers and the
gradients of an ordinary step are already counted), records the peak resident set size, then
takes 3 steps of the variant and reports how much the peak grew (MiB): the memory a JD step
needs on top of an ordinary training step. CPU, 1 thread; peak RSS (``ru_maxrss``) has ~1 MiB
resolution and includes freed-but-cached allocator blocks, so small differences are noise.
The jdoptim column runs the solvers op by op (``set_eager_compilation(False)``): compiling them
on the first call costs about 100 MiB once per process (the compiler itself), which is not a
per-step cost.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [("W1", 8), ("W1", 32), ("W2", 64), ("W2", 256), ("W3", 32), ("W4", 32), ("W5", 32)]


def _child(name: str, size: int, variant: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import workloads as W
    from bench_workloads import jd_step

    torch.set_num_threads(1)
    w = W.make(name, size)
    W.plain_step(w)()
    if variant == "jdoptim":
        # The memory of the step itself: the solvers' loops run op by op, so that the one-time
        # cost of compiling them (Inductor and its code cache, about 100 MiB of resident memory
        # once per process, whatever the workload) is not counted as a per-step cost.
        from jdoptim.solvers import set_eager_compilation

        set_eager_compilation(False)
        step, _ = jd_step(w, compiled=False)
    elif variant == "plain":
        step = W.plain_step(w)
    else:
        steps = W.torchjd_steps(w)
        if variant not in steps:
            print(json.dumps(None))
            return
        step = steps[variant]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps((after - before) / 1024))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] != "--":
        _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
        return
    variants = ["plain", "jdoptim", "autojac", "autogram", "mtl_backward"]
    print("peak extra memory over a plain step (MiB)")
    print(f"{'workload':<10}" + "".join(f"{v:>14}" for v in variants))
    for name, size in CASES:
        cells = []
        for variant in variants:
            out = subprocess.run(
                [sys.executable, __file__, name, str(size), variant],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [line for line in out.stdout.splitlines() if line.strip()]
            value = json.loads(lines[-1]) if out.returncode == 0 and lines else "err"
            cells.append("-" if value is None else (value if value == "err" else f"{value:.1f}"))
        label = f"{name} {'m' if name == 'W1' else 'B'}={size}"
        print(f"{label:<10}" + "".join(f"{c:>14}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
