"""A JDOptimizer step with a loss-level Scalarizer vs a plain step (eager, 1 thread).

Run: ``python bench/bench_scalarizer.py``. Workload: MLP 64-256-256-3 (ReLU) with 3 regression
losses (one per output), B = 256, Adam. Each step = zero_grad + forward + backward + Adam step:
(a) plain: ``losses.sum().backward()``; (b) ``JDOptimizer(opt, FAMO(3)).step(losses)``;
(c) the same with ``Sum()``; (d) FAMO with its ``update`` through ``step(closure=...)`` (one
extra forward without grad, as the FAMO paper). Median of 200 steps after 20 warm-up steps,
interleaved so that machine noise hits every variant alike; ratios are to (a).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.scalarization import FAMO, Sum

torch.set_num_threads(1)


def main(n: int = 200, warmup: int = 20) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = torch.randn(256, 64), torch.randn(256, 3)
    variants = {}
    for name in ("plain", "FAMO", "Sum", "FAMO+update"):
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 3))  # fmt: skip
        inner = torch.optim.Adam(model.parameters(), lr=1e-3)

        def losses_of(m=model) -> torch.Tensor:
            return ((m(x) - y) ** 2).mean(0)

        if name == "plain":

            def step(m=model, opt=inner) -> None:
                opt.zero_grad(set_to_none=True)
                ((m(x) - y) ** 2).mean(0).sum().backward()
                opt.step()

        else:
            jd = JDOptimizer(inner, FAMO(3) if name.startswith("FAMO") else Sum())
            if name == "FAMO+update":

                def step(opt=jd, f=losses_of) -> None:
                    opt.zero_grad()
                    opt.step(closure=f)

            else:

                def step(opt=jd, f=losses_of) -> None:
                    opt.zero_grad()
                    opt.step(f())

        variants[name] = step
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + n):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["plain"]
    print(f"{'variant':<14}{'median ms':>10}{'ratio':>8}")
    for k, v in medians.items():
        print(f"{k:<14}{1e3 * v:>10.3f}{v / base:>8.3f}")
    return medians


if __name__ == "__main__":
    main()
