"""Distributed Jacobian descent with DDP: the global step over every rank's samples.

Run on 2 CPU processes (gloo) or 2 GPUs (nccl)::

    torchrun --nproc-per-node 2 examples/distributed.py

(``python examples/distributed.py`` launches that torchrun command itself, on CPU.) Each
rank trains a DDP-wrapped model on its own shard of the batch, with one loss per sample.
``JDOptimizer`` sees that ``torch.distributed`` is initialised and takes the **global** step:
the objectives are the samples of all ranks, the Gramian includes the cross-rank pairs (the
layer-wise engine all-gathers each layer's inputs and output gradients), every rank computes
the same weights and the same update. So the replicas stay bitwise identical, and the step is
the one a single process would take on the whole batch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def train(rank: int, world_size: int, steps: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        UPGradWeighting(),
        model=model,  # the layer-wise engine hooks the inner module's layers
        batch_dim=0,  # one loss per sample
    )
    per_rank = 8
    history = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step % 2)  # two global batches, in turn
        x = torch.randn(world_size * per_rank, 16, generator=g)
        y = torch.randint(0, 4, (world_size * per_rank,), generator=g)
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        losses = nn.functional.cross_entropy(
            ddp(x[shard].to(device)), y[shard].to(device), reduction="none"
        )
        optimizer.zero_grad()
        optimizer.step(losses)
        history.append(float(losses.mean()))
    # Every rank holds exactly the same parameters.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(copies, flat)
    assert all(torch.equal(c, flat) for c in copies), "the replicas drifted"
    return history


def main(steps: int = 20, world_size: int = 2) -> None:
    if "RANK" not in os.environ:  # not under torchrun: launch it (gloo on CPU)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={world_size}", __file__, f"--steps={steps}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{done.stdout}\n{done.stderr}")
        print(done.stdout.strip())
        return
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    history = train(rank, world_size, steps, device)
    dist.destroy_process_group()
    if rank == 0:
        print(f"{world_size} ranks, identical replicas; mean loss of rank 0's shard "
              f"{history[0]:.3f} -> {history[-1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
