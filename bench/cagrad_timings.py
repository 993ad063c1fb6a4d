"""CAGradWeighting timings (1 thread): torch solver eager / compiled against the cvxpy reference.

Run: ``python bench/cagrad_timings.py``. Prints compile time and median per-call times.
"""

from __future__ import annotations

import time
import warnings

import torch

from jdoptim.aggregation import CAGradWeighting

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


def _median_ms(fn, G: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(G)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    torch_w, cvxpy_w = CAGradWeighting(0.5), CAGradWeighting(0.5, solver="cvxpy")
    for m in (2, 8, 32, 64):
        g = torch.Generator().manual_seed(m)
        J = torch.randn(m, 2 * m + 3, generator=g)
        G = J @ J.T
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: torch_w(x), fullgraph=True)
        start = time.perf_counter()
        compiled(G)
        compile_s = time.perf_counter() - start
        eager_ms = _median_ms(torch_w, G, 7)
        compiled_ms = _median_ms(compiled, G, 7)
        cvxpy_ms = _median_ms(cvxpy_w, G, 5)
        diff = float((compiled(G) - torch_w(G)).abs().max())
        print(
            f"m={m:3d}  compile {compile_s:5.1f} s  eager {eager_ms:7.2f} ms  "
            f"compiled {compiled_ms:7.2f} ms  cvxpy {cvxpy_ms:7.2f} ms  |compiled-eager| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
