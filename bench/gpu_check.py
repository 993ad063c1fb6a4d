"""One-shot GPU check of the Triton kernels and of compiled JD steps (target: < 3 min on an H100).

Run: ``python bench/gpu_check.py``. Sections (each in its own ``try``: a failure is printed and
the next section still runs):

1. kernels against torch: ``gram_accumulate`` (several ``[M, n]``, float32/bfloat16/float16)
   and ``linear_gram`` (plain, sequence, several losses per sample, grouped), relative error to a
   float64 reference of the same input values, exact symmetry;
2. timings of each kernel against the ``torch.mm``-based path it replaces (CUDA events, median);
   the kernels under ``torch.compile(fullgraph=True)`` (``triton_op`` path): 0 graph breaks,
   compiled == eager, no recompilation on new values;
3. compiled JD steps with the kernels enabled: ``JDOptimizer(SGD, UPGradWeighting())`` on a small
   MLP (Jacobian engine, 4 task losses), the layer-wise engine on an IWRM MLP (one loss per
   sample) and the multi-task engine on a trunk with 32 linear heads, whole step under
   ``torch.compile``; compiled == eager (kernels off) for a few steps;
   then steps under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync); time per step
   against a plain step (eager and compiled);
4. a summary table.

Exits with a message (status 0) when no CUDA device is present. ``--dry-run`` runs the same
code on CPU with tiny sizes (kernels through the Triton interpreter when ``TRITON_INTERPRET=1``)
to check the script itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS: list[tuple[str, str, str, str]] = []  # (section, case, result, status)
START = time.perf_counter()
BUDGET_S = 170.0  # stop starting new work after this (the lead's run is capped at ~5 min)


def record(section: str, case: str, result: str, ok: bool | None = True) -> None:
    status = "ok" if ok else ("FAIL" if ok is False else "info")
    ROWS.append((section, case, result, status))
    print(f"[{section}] {case}: {result} [{status}]", flush=True)


def out_of_time() -> bool:
    return time.perf_counter() - START > BUDGET_S


def section(name: str):
    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args, **kwargs) -> None:
            if out_of_time():
                record(name, "skipped", "time budget spent", None)
                return
            t0 = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - report and go on
                traceback.print_exc()
                record(name, "section error", f"{type(error).__name__}: {error}"[:200], False)
            print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)

        return run

    return wrap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median time of ``fn()`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def rel_err(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------- 1 and 2


@section("1-gram")
def check_gram(device: torch.device, dry: bool) -> None:
    from jdoptim.kernels import gram_accumulate, gram_accumulate_reference
    from jdoptim.kernels._common import launchable

    shapes = [(5, 37), (17, 1000)] if dry else [
        (1, 1000), (8, 1_000_003), (37, 100_001), (64, 1 << 20), (200, 50_000), (1000, 4096),
    ]  # fmt: skip
    for m, n in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            block = torch.randn(m, n, device=device).to(dtype)
            acc = torch.randn(m, m, device=device)
            acc = acc + acc.T
            ref = acc.double() + block.double() @ block.double().T
            out = gram_accumulate(acc, block)
            err_k = rel_err(out, ref)
            err_t = rel_err(gram_accumulate_reference(acc, block), ref)
            sym = bool(torch.equal(out, out.T))
            ok = err_k < 1e-4 and (sym or not launchable(block)) and err_k <= 10 * err_t + 1e-6
            name = f"M={m} n={n} {str(dtype)[6:]}"
            record("1-gram", name, f"err {err_k:.1e} (torch.mm {err_t:.1e}) sym={sym}", ok)
            if dtype != torch.float32 and m > 300:
                continue
            t_k = bench(lambda a=acc, b=block: gram_accumulate(a, b), device)
            t_t = bench(lambda a=acc, b=block: gram_accumulate_reference(a, b), device)
            record(
                "2-time",
                f"gram {name}",
                f"kernel {t_k:.3f} ms, torch {t_t:.3f} ms, x{t_t / t_k:.2f}",
                None,
            )


@section("1-linear_gram")
def check_linear_gram(device: torch.device, dry: bool) -> None:
    from jdoptim.kernels import linear_gram, linear_gram_reference
    from jdoptim.kernels._common import launchable

    cases = [(1, 9, 1, 1, 7, 5, True), (1, 4, 2, 3, 6, 5, False)] if dry else [
        (1, 256, 1, 1, 512, 512, True),  # IWRM MLP layer
        (1, 1024, 1, 1, 256, 10, True),  # large batch, small head
        (1, 64, 1, 128, 64, 64, False),  # sequence form
        (1, 32, 4, 16, 128, 10, True),  # several losses per sample
        (4, 16, 1, 49, 72, 16, True),  # grouped convolution (unfolded)
    ]  # fmt: skip
    for G, B, K, T, d, p, bias in cases:
        for dtype in (torch.float32, torch.bfloat16):
            A = torch.randn(G, B, T, d, device=device).to(dtype)
            D = torch.randn(G, B, K, T, p, device=device).to(dtype)
            ref = linear_gram_reference(A.double(), D.double(), bias)
            out = linear_gram(A, D, bias)
            err_k = rel_err(out, ref)
            err_t = rel_err(linear_gram_reference(A, D, bias), ref)
            flat = out.reshape(B * K, B * K)
            sym = bool(torch.equal(flat, flat.T))
            ok = err_k < 1e-4 and (sym or not launchable(A)) and err_k <= 10 * err_t + 1e-6
            name = f"G={G} B={B} K={K} T={T} d={d} p={p} bias={bias} {str(dtype)[6:]}"
            record("1-linear", name, f"err {err_k:.1e} (torch {err_t:.1e}) sym={sym}", ok)
            t_k = bench(lambda a=A, b=D, c=bias: linear_gram(a, b, c), device)
            t_t = bench(lambda a=A, b=D, c=bias: linear_gram_reference(a, b, c), device)
            record(
                "2-time",
                f"linear {name}",
                f"kernel {t_k:.3f} ms, torch {t_t:.3f} ms, x{t_t / t_k:.2f}",
                None,
            )


@section("2-compile-ops")
def check_compiled_ops(device: torch.device, dry: bool) -> None:
    from jdoptim.kernels import gram_accumulate, linear_gram

    if device.type != "cuda":  # a triton_op compiles on CUDA only (not in the interpreter)
        record("2-compile-ops", "triton_op under torch.compile", "skipped: needs CUDA", None)
        return

    def fn(acc: Tensor, block: Tensor, A: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
        return gram_accumulate(acc, block), linear_gram(A, D, True)

    def inputs() -> tuple[Tensor, ...]:
        return (
            torch.zeros(24, 24, device=device),
            torch.randn(24, 3000, device=device, dtype=torch.bfloat16),
            torch.randn(1, 40, 3, 20, device=device),
            torch.randn(1, 40, 1, 3, 12, device=device),
        )

    torch._dynamo.reset()
    args = inputs()
    explained = torch._dynamo.explain(fn)(*args)
    record(
        "2-compile-ops",
        "graph breaks (triton_op)",
        f"{explained.graph_break_count} breaks, {explained.graph_count} graph(s)",
        explained.graph_break_count == 0,
    )
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    t0 = time.perf_counter()
    out_c = compiled(*args)
    t_compile = time.perf_counter() - t0
    out_e = fn(*args)
    err = max(rel_err(c, e.double()) for c, e in zip(out_c, out_e, strict=True))
    record(
        "2-compile-ops",
        "compiled == eager",
        f"err {err:.1e}, compile {t_compile:.1f} s",
        err < 1e-5,
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        args = inputs()
        out_c = compiled(*args)
    err = max(rel_err(c, e.double()) for c, e in zip(out_c, fn(*args), strict=True))
    record("2-compile-ops", "new values, no recompile", f"err {err:.1e}", err < 1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------- 3


def _mlp(d_in: int, hidden: int, d_out: int, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, d_out),
    ).to(device)  # fmt: skip


class _MTL(nn.Module):
    """Shared trunk + one linear head per task (the multi-task engine's layout)."""

    def __init__(self, d_in: int, hidden: int, n_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


def _jd_case(name: str, device: torch.device, dry: bool, engine: str) -> None:
    from jdoptim import JDOptimizer, kernels
    from jdoptim.aggregation import UPGradWeighting
    from jdoptim.gramian import MultiTaskGramianEngine

    B = 16 if dry else 128
    d_in, hidden, d_out = (8, 16, 4) if dry else (64, 256, 4)
    if engine == "multitask" and not dry:
        d_out = 32  # tasks

    def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if engine == "layerwise":  # IWRM: one loss per sample
            return ((model(x) - y) ** 2).sum(1)
        return ((model(x) - y) ** 2).mean(0)  # one loss per output (task)

    def make(seed: int = 0) -> tuple[nn.Module, JDOptimizer]:
        extra: dict = {}
        if engine == "multitask":
            torch.manual_seed(seed)
            model: nn.Module = _MTL(d_in, hidden, d_out).to(device)
            extra["engine"] = MultiTaskGramianEngine(model.trunk, model.heads)
        else:
            model = _mlp(d_in, hidden, d_out, device, seed)
        if engine == "layerwise":
            extra = {"engine": "layerwise", "model": model, "batch_dim": 0}
        opt = JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-2),
            UPGradWeighting(),
            nonfinite="propagate",  # no finiteness check: no host read
            **extra,
        )
        return model, opt

    def make_step(model: nn.Module, opt: JDOptimizer) -> Callable[[Tensor, Tensor], Tensor]:
        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad()
            return opt.step(task_losses(model, x, y))

        return step

    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [
        (
            torch.randn(B, d_in, generator=gen).to(device),
            torch.randn(B, d_out, generator=gen).to(device),
        )
        for _ in range(4)
    ]
    torch._dynamo.reset()
    use_kernels = device.type == "cuda"  # the triton_op compile path exists on CUDA only
    if use_kernels:
        kernels.enable("cuda")
    try:
        model_c, opt_c = make()
        model_e, opt_e = make()
        compiled = torch.compile(make_step(model_c, opt_c))
        t0 = time.perf_counter()
        compiled(*batches[0])
        sync(device)
        record(name, "first compiled step", f"{time.perf_counter() - t0:.1f} s (compile)", None)
        if use_kernels:
            kernels.disable("cuda")
        make_step(model_e, opt_e)(*batches[0])  # eager reference without the kernels
        if use_kernels:
            kernels.enable("cuda")
        worst = 0.0
        for x, y in batches[1:]:
            w_c = compiled(x, y)
            if use_kernels:
                kernels.disable("cuda")
            w_e = make_step(model_e, opt_e)(x, y)
            if use_kernels:
                kernels.enable("cuda")
            worst = max(worst, rel_err(w_c, w_e.double()))
        for p, q in zip(model_c.parameters(), model_e.parameters(), strict=True):
            worst = max(worst, rel_err(p.detach(), q.detach().double()))
        record(
            name, "compiled (kernels) == eager (torch)", f"max rel err {worst:.1e}", worst < 1e-4
        )

        # No host synchronisation in a compiled step after warm-up.
        if device.type == "cuda":
            sync(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                for x, y in batches:
                    compiled(x, y)
                verdict, ok = "no sync in 4 steps", True
            except RuntimeError as error:
                verdict, ok = f"sync: {str(error).splitlines()[0][:120]}", False
            finally:
                torch.cuda.set_sync_debug_mode(0)
            record(name, "sync_debug_mode('error')", verdict, ok)

        # Timings: plain step (mean loss, backward, SGD) eager and compiled, JD eager and compiled.
        model_p = make()[0]
        opt_p = torch.optim.SGD(model_p.parameters(), lr=1e-2)
        x, y = batches[0]

        def plain() -> None:
            opt_p.zero_grad()
            task_losses(model_p, x, y).mean().backward()
            opt_p.step()

        plain_c = torch.compile(plain)
        jd_e = make_step(model_e, opt_e)
        t_plain = bench(plain, device)
        t_plain_c = bench(plain_c, device)
        t_jd_c = bench(lambda: compiled(x, y), device)
        if use_kernels:
            kernels.disable("cuda")
        t_jd_e = bench(lambda: jd_e(x, y), device, reps=10)
        record(
            name,
            "time per step",
            f"plain {t_plain:.3f} ms | plain compiled {t_plain_c:.3f} ms | JD eager {t_jd_e:.3f} "
            f"ms | JD compiled {t_jd_c:.3f} ms (x{t_jd_c / t_plain:.2f} plain eager)",
            None,
        )
    finally:
        kernels.disable("cuda")
        torch._dynamo.reset()


@section("3-jd-jacobian")
def check_jd_jacobian(device: torch.device, dry: bool) -> None:
    _jd_case("3-jd-jacobian", device, dry, engine="jacobian")


@section("3-jd-layerwise")
def check_jd_layerwise(device: torch.device, dry: bool) -> None:
    _jd_case("3-jd-layerwise", device, dry, engine="layerwise")


@section("3-jd-multitask")
def check_jd_multitask(device: torch.device, dry: bool) -> None:
    _jd_case("3-jd-multitask", device, dry, engine="multitask")


def print_table() -> None:
    widths = [max(len(r[i]) for r in ROWS) for i in range(4)] if ROWS else [0] * 4
    widths[2] = min(widths[2], 110)
    print("\n" + "=" * 40 + " summary " + "=" * 40)
    for row in ROWS:
        print(
            "  ".join(
                c.ljust(w) if i < 3 else c for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    fails = sum(r[3] == "FAIL" for r in ROWS)
    print(f"{len(ROWS)} rows, {fails} failure(s), {time.perf_counter() - START:.0f} s in all")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (script check)")
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device found; nothing to check (use --dry-run on CPU).")
            return 0
        device = torch.device("cuda")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (kernel sections will use torch)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {name}; torch {torch.__version__}; triton {triton_version}", flush=True)
    print(f"float32 matmul precision: {torch.get_float32_matmul_precision()}", flush=True)
    for check in (check_gram, check_linear_gram, check_compiled_ops):
        check(device, args.dry_run)
    for check in (check_jd_jacobian, check_jd_layerwise, check_jd_multitask):
        check(device, args.dry_run)
    print_table()
    return 1 if any(r[3] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
