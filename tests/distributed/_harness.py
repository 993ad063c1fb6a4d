"""Run scenarios on ``R`` gloo ranks (CPU, 127.0.0.1, a free port) in one process group.

Each scenario is a function ``(rank, world) -> dict`` of tensors / strings, run on every rank
in the same order; its results are saved per rank and read back by the test. A scenario that
raises stores the error's type and message instead, so that the others still run (and the
ranks stay in step: every scenario runs its collectives on every rank).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Scenario = Callable[[int, int], dict]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, module: str, names: list[str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("JDOPTIM_COMPILE_SOLVERS", "0")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    import importlib

    scenarios = importlib.import_module(module).SCENARIOS
    results: dict[str, dict] = {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = scenarios[name](rank, world)
        except Exception as error:  # recorded, checked by the test
            results[name] = {"error": f"{type(error).__name__}: {error}",
                             "trace": traceback.format_exc()}  # fmt: skip
        results[name]["seconds"] = time.perf_counter() - start
        dist.barrier()
    torch.save(results, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def run(world: int, module: str, names: list[str], timeout: float = 240.0) -> list[dict]:
    """Results of ``names`` (scenarios of ``module.SCENARIOS``) on ``world`` ranks, per rank."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _worker,
            args=(world, free_port(), module, names, out),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"The {world} ranks did not finish in {timeout} s.")
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]
