"""The standard workloads (W1 MTL, W2 IWRM MLP, W3 IWRM CNN, W4 Transformer, W5 GRU) with UPGrad.

Run: ``python bench/bench_workloads.py [--only W2] [--repeats 30]``. One thread, fixed seeds.
For each workload it prints the median step time of

* ``plain``: forward, mean loss, ``backward()``, SGD step (and ``plain comp.``: the same step
  under ``torch.compile``);
* ``jdoptim eager`` / ``jdoptim compiled``: forward + ``JDOptimizer(SGD, UPGradWeighting())``
  ``.step(losses)`` (the layer-wise engine for per-sample losses, ``model=`` and
  ``batch_dim=0``; the :class:`~jdoptim.gramian.MultiTaskGramianEngine` on the encoder and
  heads for the multi-task W1); compiled = the whole step under ``torch.compile``;
* ``jd warm``: compiled, with ``UPGradWeighting(warm_start=True)`` (the QP starts from the
  previous step's solution; the workloads reuse one batch, so consecutive problems are close);
* ``torchjd``: the fastest of torchjd's UPGrad variants (``autojac``, ``autogram``,
  ``mtl_backward``) when torchjd is installed (``pip install torchjd[quadprog_projector]``),

and the ratios to the plain step measured in the same run (``jd compiled`` also to the
compiled plain step, marked ``c``). ``--phases`` adds a breakdown of the
jdoptim eager step (forward, Gramian engine, weighting, weighted gradient + SGD step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as W  # noqa: E402

from jdoptim import JDOptimizer  # noqa: E402
from jdoptim.aggregation import UPGradWeighting  # noqa: E402
from jdoptim.gramian import GramianEngine, MultiTaskGramianEngine  # noqa: E402
from jdoptim.solvers import dual_cone  # noqa: E402

# The steady state of a long run: the compiled pivoting of m <= 32 from the first call (a
# process normally runs the eager one for its first PADDED_PIVOT_AFTER_CALLS calls).
dual_cone.PADDED_PIVOT_AFTER_CALLS = 0

CASES = [
    ("W1", 2),
    ("W1", 8),
    ("W1", 32),
    ("W2", 16),
    ("W2", 64),
    ("W2", 256),
    ("W3", 32),
    ("W4", 32),
    ("W5", 32),
]


def jd_step(w: W.Workload, compiled: bool, warm_start: bool = False, engine: str = "auto"):
    """A jdoptim step: the layer-wise engine for per-sample losses, the multi-task engine
    (trunk + heads) for W1, or ``engine="jacobian"`` for the batched-vjp Jacobian engine."""
    iwrm = w.kind == "iwrm"
    chosen: str | GramianEngine = engine
    if engine == "auto" and not iwrm:
        chosen = MultiTaskGramianEngine(w.model.encoder, w.model.heads)
    opt = JDOptimizer(
        torch.optim.SGD(w.model.parameters(), lr=1e-3),
        UPGradWeighting(warm_start=warm_start),
        model=w.model if iwrm else None,
        batch_dim=0 if iwrm else None,
        engine=chosen,
    )

    def step() -> torch.Tensor:
        opt.zero_grad()
        return opt.step(w.losses(w.model, w.x, w.y))

    return (torch.compile(step) if compiled else step), opt


def phases(w: W.Workload, repeats: int, engine: str = "auto") -> dict[str, float]:
    """Median ms of each phase of an eager jdoptim step."""
    _, opt = jd_step(w, compiled=False, engine=engine)
    params = [p for p in w.model.parameters() if p.requires_grad]
    weighting = UPGradWeighting()
    out: dict[str, list[float]] = {"forward": [], "gramian": [], "weighting": [], "grad+step": []}
    for k in range(repeats + 3):
        t0 = time.perf_counter()
        losses = w.losses(w.model, w.x, w.y).reshape(-1)
        t1 = time.perf_counter()
        result = opt.engine.compute(losses, params)
        t2 = time.perf_counter()
        weights = weighting(result.gramian)
        t3 = time.perf_counter()
        for p, g in zip(
            params, result.weighted_gradient(weights.to(result.gramian.dtype)), strict=True
        ):
            p.grad = g
        opt.optimizer.step()
        t4 = time.perf_counter()
        if k >= 3:
            for key, dt in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                out[key].append(dt)
    return {k: 1e3 * statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run only workloads whose name starts with this")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--phases", action="store_true")
    parser.add_argument(
        "--engine",
        default="auto",
        help='"auto" (layer-wise / multi-task engine) or "jacobian" (batched-vjp Jacobian engine)',
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats} steps (ms)")
    header = (
        f"{'workload':<12}{'plain':>8}{'jd eager':>18}{'plain comp.':>12}{'jd compiled':>26}"
        f"{'jd warm':>18}{'torchjd best':>26}"
    )
    print(header)
    for name, size in CASES:
        torch._dynamo.reset()  # each workload compiles its own closures of the same functions
        if args.only and not f"{name} ".startswith(args.only) and not name.startswith(args.only):
            continue
        plain_w = W.make(name, size)
        plain = W.median_ms(W.plain_step(plain_w), repeats=args.repeats)
        eager_step, _ = jd_step(W.make(name, size), compiled=False, engine=args.engine)
        eager = W.median_ms(eager_step, repeats=args.repeats)
        compiled = warm = plain_compiled = float("nan")
        if not args.no_compile:
            # The plain step compiled too: the JD step's ratio to it compares like with like
            # (torch's compiled CPU code can be slower than eager, e.g. for boolean masks).
            plain_c = torch.compile(W.plain_step(W.make(name, size)))
            plain_compiled = W.median_ms(plain_c, warmup=3, repeats=args.repeats)
            torch._dynamo.reset()
            compiled_step, _ = jd_step(W.make(name, size), compiled=True, engine=args.engine)
            compiled = W.median_ms(compiled_step, warmup=3, repeats=args.repeats)
            torch._dynamo.reset()
            warm_step, _ = jd_step(
                W.make(name, size), compiled=True, warm_start=True, engine=args.engine
            )
            warm = W.median_ms(warm_step, warmup=3, repeats=args.repeats)
        best, best_name = float("nan"), "-"
        if not args.no_torchjd:
            reps = max(3, args.repeats // 5) if (name, size) == ("W2", 256) else args.repeats
            for variant, fn in W.torchjd_steps(W.make(name, size)).items():
                t = W.median_ms(fn, warmup=2, repeats=reps)
                if not t >= best:
                    best, best_name = t, variant
        print(
            f"{plain_w.name:<12}{plain:>8.2f}{eager:>10.2f} ({eager / plain:>4.1f}x)"
            f"{plain_compiled:>12.2f}"
            f"{compiled:>10.2f} ({compiled / plain:>4.1f}x, {compiled / plain_compiled:>4.1f}x c)"
            f"{warm:>10.2f} ({warm / plain:>4.1f}x)"
            f"{best:>10.2f} ({best / plain:>5.1f}x, {best_name})"
        )
        if args.phases:
            ph = phases(W.make(name, size), args.repeats, args.engine)
            print("    eager phases: " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
