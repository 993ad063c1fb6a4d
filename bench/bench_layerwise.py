"""Layer-wise engine vs a plain step vs the brute-force batched-vjp Gramian (eager, 1 thread).

Run: ``python bench/bench_layerwise.py``. Workloads:

* W2: MLP 32-128-128-10 (ReLU), per-sample cross-entropy, B = 16, 64, 256;
* W3: Conv(3->16, 3x3)-ReLU-Conv(16->32, 3x3)-ReLU-global-avg-pool-Linear(32->10), 3x32x32, B = 32.

Times, median of 30 steps after 5 warm-up steps, each step = zero_grad + forward + ... + SGD:
(a) plain: mean loss, ``backward``; (b) layer-wise: per-sample losses, Gramian, uniform weights,
weighted gradient into ``.grad`` (no second backward); (c) brute force: the Jacobian engine
(batched vector-Jacobian products, Jacobian materialised), same weights. Ratios are to (a).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from jdoptim.gramian import JacobianEngine
from jdoptim.gramian.layerwise import LayerwiseGramianEngine

torch.set_num_threads(1)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def timeit(step, n: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    B = x.shape[0]
    w = torch.full((B,), 1.0 / B)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def with_engine(engine) -> None:
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        result = engine.compute(losses, params)
        for p, g in zip(params, result.weighted_gradient(w), strict=True):
            p.grad = g
        opt.step()

    t_plain = timeit(plain)
    layerwise = LayerwiseGramianEngine(model)
    t_lw = timeit(lambda: with_engine(layerwise))
    layerwise.remove()
    t_bf = timeit(lambda: with_engine(JacobianEngine()))
    print(
        f"{name:12s} plain {1e3 * t_plain:8.3f} ms | layerwise {1e3 * t_lw:8.3f} ms "
        f"({t_lw / t_plain:5.2f}x) | batched vjp {1e3 * t_bf:8.3f} ms ({t_bf / t_plain:6.2f}x)"
    )


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for B in (16, 64, 256):
        run(f"W2 B={B}", mlp(), torch.randn(B, 32), torch.randint(0, 10, (B,)))
    run("W3 B=32", cnn(), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))


if __name__ == "__main__":
    main()
