"""Median step time of a JD step against a plain SGD step (small MLP, m = 8 losses, 1 thread).

Run: ``python bench/bench_optimizer.py [--steps N] [--weighting UPGrad]``. Prints, for eager and
``torch.compile`` (default inductor; compiled functions are warmed up before timing), the median
time of

* a plain step: forward, ``losses.mean().backward()``, ``SGD.step()``;
* a JD step: forward, ``JDOptimizer(SGD, weighting).step(losses)`` (Jacobian engine, Gramian,
  weighting, weighted gradient, SGD step);

and the ratio JD / plain.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import jdoptim.aggregation as agg
from jdoptim import JDOptimizer

M, BATCH, D_IN, HIDDEN = 8, 64, 32, 64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, M),
    )


def _median_ms(fn, x, y, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn(x, y)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _plain_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean(0).mean().backward()
        opt.step()

    return step


def _jd_step(weighting: str):
    model = _model()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), getattr(agg, weighting)())

    def step(x, y):
        opt.zero_grad()
        opt.step(((model(x) - y) ** 2).mean(0))  # m = 8 losses, one per output

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--weighting", default="UPGradWeighting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = torch.randn(BATCH, D_IN), torch.randn(BATCH, M)
    print(f"MLP {D_IN}-{HIDDEN}-{HIDDEN}-{M}, batch {BATCH}, m = {M}, {args.weighting}, 1 thread")
    print(f"{'mode':<10}{'plain SGD (ms)':>16}{'JD step (ms)':>16}{'ratio':>8}")
    for mode in ("eager", "compiled"):
        plain, jd = _plain_step(), _jd_step(args.weighting)
        if mode == "compiled":
            torch._dynamo.reset()
            plain, jd = torch.compile(plain), torch.compile(jd)
        warmup = 3 if mode == "compiled" else 10
        t_plain = _median_ms(plain, x, y, args.steps, warmup)
        t_jd = _median_ms(jd, x, y, args.steps, warmup)
        print(f"{mode:<10}{t_plain:>16.3f}{t_jd:>16.3f}{t_jd / t_plain:>8.2f}")


if __name__ == "__main__":
    main()
