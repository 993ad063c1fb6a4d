"""Distributed JD on 2 CPU ranks (gloo): time per step and bytes sent per step.

Run: ``python bench/bench_distributed.py [--steps 20] [--world 2]``. Spawns the ranks itself
(one torch thread each, 127.0.0.1). Workloads of ``workloads.py``, each rank with its own
batch: W1 m=8 (multi-task, 128 samples per rank) and W2 B=64 per rank (per-sample losses).
Rows:

* ``plain DDP``: DDP model, mean loss, ``backward()``, SGD step;
* ``local``: ``JDOptimizer(..., distributed="local")`` (JD on the rank's own objectives, the
  gradients averaged);
* ``global <engine>``: the global step with that engine.

Bytes are counted from the collectives' tensor sizes: for JD the
:class:`jdoptim.distributed.Communicator`'s ``stats`` (every tensor handed to an all-reduce,
all-gather or broadcast; the local tensor for an all-gather), for DDP a communication hook
counting its gradient buckets. With 2 ranks and ring collectives that is also what each rank
sends. Times are medians of ``--steps`` eager steps after 3 warm-up steps, rank 0's clock.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as W  # noqa: E402

from jdoptim import JDOptimizer  # noqa: E402
from jdoptim.aggregation import UPGradWeighting  # noqa: E402
from jdoptim.gramian import MultiTaskGramianEngine  # noqa: E402


def _ddp_counting(model: torch.nn.Module, counter: list[int]) -> DDP:
    ddp = DDP(model)

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
        buffer = bucket.buffer()
        counter[0] += buffer.numel() * buffer.element_size()
        work = dist.all_reduce(buffer.div_(dist.get_world_size()), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, hook)
    return ddp


def _rows(name: str, size: int, rank: int, steps: int) -> list[tuple]:
    variants = ["plain DDP", "local", "global jacobian"]
    variants.append("global multitask" if name == "W1" else "global layerwise")
    return [_measure(name, size, variant, rank, steps) for variant in variants]


def _measure(name: str, size: int, variant: str, rank: int, steps: int) -> tuple:
    w = W.make(name, size, seed=0)
    torch.manual_seed(1 + rank)  # each rank its own batch
    w.x = torch.randn_like(w.x)
    if w.kind == "mtl":
        w.y = torch.randn_like(w.y)
    else:
        w.y = torch.randint(0, 10, w.y.shape)
    counter = [0]
    comm_of = None
    if variant == "plain DDP":
        ddp = _ddp_counting(w.model, counter)
        sgd = torch.optim.SGD(w.model.parameters(), lr=1e-3)

        def step() -> None:
            sgd.zero_grad()
            w.losses(ddp, w.x, w.y).mean().backward()
            sgd.step()

    else:
        mode = "local" if variant == "local" else "global"
        kw: dict = {}
        if w.kind == "iwrm":
            kw = {"batch_dim": 0}
            if variant != "global jacobian":
                kw["model"] = w.model
            else:
                kw["engine"] = "jacobian"
        elif variant == "global multitask":
            kw = {"engine": MultiTaskGramianEngine(w.model.encoder, w.model.heads)}
        opt = JDOptimizer(
            torch.optim.SGD(w.model.parameters(), lr=1e-3),
            UPGradWeighting(),
            distributed=mode,
            **kw,
        )

        def step() -> None:
            opt.zero_grad()
            opt.step(w.losses(w.model, w.x, w.y))

        def comm_of() -> object:
            return opt.communicator

    for _ in range(3):
        step()
    if comm_of is not None:
        comm_of().reset_stats()
    counter[0] = 0
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    nbytes = counter[0] if comm_of is None else comm_of().bytes()
    n = sum(p.numel() for p in w.model.parameters())
    return (w.name, variant, 1e3 * statistics.median(times), nbytes / steps, n)


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("JDOPTIM_COMPILE_SOLVERS", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    rows = _rows("W1", 8, rank, steps) + _rows("W2", 64, rank, steps)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args.world, port, args.steps, out), nprocs=args.world)
        rows = torch.load(out)
    print(f"{args.world} ranks, gloo, CPU, 1 thread per rank, torch {torch.__version__}")
    print("| workload | variant | ms / step | x DDP time | bytes / step | x DDP bytes |")
    print("|---|---|---:|---:|---:|---:|")
    base: dict[str, tuple[float, float]] = {}
    for name, variant, ms, nbytes, _ in rows:
        if variant == "plain DDP":
            base[name] = (ms, nbytes)
        t0, b0 = base[name]
        print(f"| {name} | {variant} | {ms:.2f} | {ms / t0:.1f} | {nbytes:,.0f} | "
              f"{nbytes / b0:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
