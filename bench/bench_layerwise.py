"""Layer-wise engine vs a plain step vs the brute-force batched-vjp Gramian (eager, 1 thread).

Run: ``python bench/bench_layerwise.py``. Workloads:

* W2: MLP 32-128-128-10 (ReLU), per-sample cross-entropy, B = 16, 64, 256;
* W3: Conv(3->16, 3x3)-ReLU-Conv(16->32, 3x3)-ReLU-global-avg-pool-Linear(32->10), 3x32x32, B = 32;
* W6 (``--only W6``): a Transformer-like block of custom modules that own their parameters
  (learned positional embedding, ``F.scaled_dot_product_attention`` attention with its own
  projection parameters and a causal mask, LayerScale, a gated MLP with its own weights), no
  ``nn.Linear`` inside; Embedding(100, 64), T = 16, B = 32, head Linear(64, 5). The layer-wise
  engine with its generic per-module rule, against the same engine with that rule turned off
  (every custom parameter through the whole-model batched-vjp fallback); ``--compile`` adds
  the compiled step (forward, Gramian and weighted gradient in one ``fullgraph`` graph).

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


class LearnedPositions(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(n, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos[: x.shape[1]]


class CausalAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.w_qkv = nn.Parameter(torch.randn(3 * d, d) / d**0.5)
        self.w_o = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (x @ self.w_qkv.T).split(d, -1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(b, t, d) @ self.w_o.T


class GatedMLP(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2 * h, d) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(d, h) / h**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = (x @ self.w_in.T).chunk(2, -1)
        return (a * F.silu(g)) @ self.w_out.T


class LayerScale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class CustomBlock(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, h: int = 128) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = CausalAttention(d, heads), GatedMLP(d, h)
        self.ls1, self.ls2 = LayerScale(d), LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class CustomTransformer(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 64, T: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), LearnedPositions(T, d)
        self.block, self.head = CustomBlock(d), nn.Linear(d, classes)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.pos(self.emb(t))).mean(1))


def without_generic_rule(engine: LayerwiseGramianEngine) -> LayerwiseGramianEngine:
    """The engine as before the generic per-module rule: its modules take the fallback."""
    for name, rule in engine.report().items():
        if rule == "vmap":
            engine._vmap_failed[name] = "turned off (bench)"
    return engine


def _gradient(model, engine, x, y, w, params) -> tuple:
    # The Gramian is returned too: the compiled graph must compute it (not eliminate it).
    losses = F.cross_entropy(model(x), y, reduction="none")
    result = engine.compute(losses, params)
    return result.gramian, result.weighted_gradient(w)


def sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: list) -> tuple:
    """``plain()``: an SGD step on the mean loss; ``with_engine(engine)``: the engine's Gramian
    of the per-sample losses and its uniformly weighted gradient, then the same SGD step."""
    opt = torch.optim.SGD(params, lr=1e-3)
    w = torch.full((x.shape[0],), 1.0 / x.shape[0])

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

    return plain, with_engine


def run_generic(B: int = 32, T: int = 16, compiled: bool = False) -> None:
    torch.manual_seed(0)
    model = CustomTransformer(T=T)
    x, y = torch.randint(0, 100, (B, T)), torch.randint(0, 5, (B,))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    w = torch.full((B,), 1.0 / B)

    plain, with_engine = sgd_steps(model, x, y, params)

    t_plain = timeit(plain, n=15)
    times = {}
    for label, make in (
        ("generic rule", lambda: LayerwiseGramianEngine(model)),
        ("fallback", lambda: without_generic_rule(LayerwiseGramianEngine(model))),
    ):
        engine = make()
        times[label] = timeit(lambda e=engine: with_engine(e), n=15)
        if label == "generic rule":
            print("report:", engine.report())
        engine.remove()
    times["jacobian"] = timeit(lambda: with_engine(JacobianEngine()), n=5, warmup=1)
    # Whole JD steps with UPGrad: jdoptim, and torchjd's autogram when it is installed.
    from jdoptim import JDOptimizer
    from jdoptim.aggregation import UPGradWeighting

    jd = JDOptimizer(torch.optim.SGD(params, lr=1e-3), UPGradWeighting(), model=model,
                     batch_dim=0)  # fmt: skip

    def jd_step() -> None:
        jd.zero_grad(set_to_none=True)
        jd.step(F.cross_entropy(model(x), y, reduction="none"))

    times["jdoptim UPGrad"] = timeit(jd_step, n=15)
    jd.close()
    try:
        import copy

        from torchjd.aggregation import UPGradWeighting as TjdUPGrad
        from torchjd.autogram import Engine

        gram_model = copy.deepcopy(model)  # autogram hooks its model for good
        gram_opt = torch.optim.SGD(gram_model.parameters(), lr=1e-3)
        tjd, weighting = Engine(gram_model, batch_dim=0), TjdUPGrad()

        def autogram() -> None:
            gram_opt.zero_grad(set_to_none=True)
            losses = F.cross_entropy(gram_model(x), y, reduction="none")
            losses.backward(weighting(tjd.compute_gramian(losses)))
            gram_opt.step()

        times["torchjd autogram UPGrad"] = timeit(autogram, n=15)
    except ImportError:
        pass
    if compiled:
        engine = LayerwiseGramianEngine(model)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            grads = torch.compile(lambda: _gradient(model, engine, x, y, w, params), fullgraph=True)
            t0 = time.perf_counter()
            G, gs = grads()
            print(f"compile {time.perf_counter() - t0:.1f} s")
            G_eager, gs_eager = _gradient(model, engine, x, y, w, params)
            err = max(
                float((a - b).abs().max() / b.abs().max())
                for a, b in zip([G, *gs], [G_eager, *gs_eager], strict=True)
            )
            print(f"compiled vs eager: max relative difference {err:.1e}")

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                G, gs = grads()
                for p, g in zip(params, gs, strict=True):
                    p.grad = g
                opt.step()

            times["generic rule, compiled"] = timeit(step, n=15)
        engine.remove()
    line = f"W6 B={B} T={T}  plain {1e3 * t_plain:7.2f} ms"
    for label, t in times.items():
        line += f" | {label} {1e3 * t:8.2f} ms ({t / t_plain:5.2f}x)"
    print(line)


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

    plain, with_engine = sgd_steps(model, x, y, params)

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
    import sys

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "--only" in sys.argv and sys.argv[sys.argv.index("--only") + 1] == "W6":
        run_generic(compiled="--compile" in sys.argv)
        return
    for B in (16, 64, 256):
        run(f"W2 B={B}", mlp(), torch.randn(B, 32), torch.randint(0, 10, (B,)))
    run("W3 B=32", cnn(), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))


if __name__ == "__main__":
    main()
