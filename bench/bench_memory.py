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
WARM = "--warm" in sys.argv
"""``--warm``: run 2 steps of the variant on a tiny copy of the workload (batch 2, or 2 tasks)
first, so that one-time costs (code pages of the libraries the variant is the first to call,
lazy initialisations: several MiB of resident memory) are not counted as the step's memory."""
HEAP = "--heap" in sys.argv
"""``--heap``: instead of the growth of the peak resident set size, the peak of the bytes that
glibc's allocator has handed out (``mallinfo2``, sampled by a thread while the step runs) above
their level at the start of each step, the largest over 3 steps: the memory a step holds at
once, like ``torch.cuda.max_memory_allocated``, without the allocator's cached blocks and the
code pages (Linux with glibc only)."""
FLAGS = [f for f in ("--warm", "--heap") if f in sys.argv]
CASES = [("W1", 8), ("W1", 32), ("W2", 64), ("W2", 256), ("W3", 32), ("W4", 32), ("W5", 32)]


def _child(name: str, size: int, variant: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import workloads as W

    torch.set_num_threads(1)
    if WARM:
        # One-time costs out: the variant's code (pages of the libraries it is the first to
        # call, lazy initialisations) is loaded by 2 steps on a tiny copy of the workload.
        tiny = W.make(name, 2)
        warm = _variant_step(tiny, variant)
        for _ in range(2 if warm is not None else 0):
            warm()
    w = W.make(name, size)
    W.plain_step(w)()
    step = _variant_step(w, variant)
    if step is None:
        print(json.dumps(None))
        return
    if HEAP:
        for _ in range(2):  # one-time allocations out
            step()
        print(json.dumps(max(_heap_peak(step) for _ in range(3))))
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps((after - before) / 1024))


def _heap_peak(step) -> float:
    """MiB: the peak of glibc's bytes in use while ``step()`` runs, above their level before."""
    import ctypes
    import threading

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                      "uordblks", "fordblks", "keepcost")
        ]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd  # heap chunks in use + mmap-ed chunks

    start = in_use()
    peak, running = [start], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], in_use())

    thread = threading.Thread(target=sample)
    thread.start()
    step()
    running[0] = False
    thread.join()
    return (peak[0] - start) / 2**20


def _variant_step(w, variant: str):
    import workloads as W
    from bench_workloads import jd_step

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
            return None
        step = steps[variant]
    return step


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--warm", "--heap")]
    if len(args) == 3 and args[0] != "--":
        _child(args[0], int(args[1]), args[2])
        return
    variants = ["plain", "jdoptim", "autojac", "autogram", "mtl_backward"]
    if HEAP:
        print("peak bytes in use during a step, above its start (MiB; glibc's allocator)")
    else:
        print("peak extra memory over a plain step (MiB)" + (", one-time costs out" * WARM))
    print(f"{'workload':<10}" + "".join(f"{v:>14}" for v in variants))
    for name, size in CASES:
        cells = []
        for variant in variants:
            out = subprocess.run(
                [sys.executable, __file__, name, str(size), variant, *FLAGS],
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
