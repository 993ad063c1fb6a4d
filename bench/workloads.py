"""The three standard workloads of ``shared/research/torchjd_timings.md`` and their plain steps.

* **W1 MTL**: shared MLP encoder 64→256→256 (ReLU) + m linear heads 256→1, batch 128,
  per-task MSE: a vector of m losses.
* **W2 IWRM**: MLP 32→128→128→10, per-sample cross-entropy (m = batch size).
* **W3 CNN IWRM**: Conv(3→16,3x3)-ReLU-Conv(16→32,3x3)-ReLU-global avg pool-Linear(32→10),
  input 3x32x32, batch 32, per-sample cross-entropy.
* **W4 Transformer IWRM** (issue 13): Embedding(100, 64), 2 x TransformerEncoderLayer(64, 4, 128,
  dropout=0, batch_first=True), mean over positions, Linear(64, 5); batch 32, sequence 16,
  per-sample cross-entropy.
* **W5 GRU IWRM** (issue 13): Embedding(100, 32), GRU(32, 64, batch_first=True), last state,
  Linear(64, 5); batch 32, sequence 16, per-sample cross-entropy.

Each workload builds a fresh model, a fixed batch and a ``losses(model)`` function; the timing
scripts wrap them in a plain SGD step, jdoptim steps and (when installed) torchjd's variants.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MTLNet(nn.Module):
    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class TransformerNet(nn.Module):
    """W4: token ids ``[B, T]`` -> 5 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(x)).mean(1))


class GRUNet(nn.Module):
    """W5: token ids ``[B, T]`` -> 5 logits from the last GRU state."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 32)
        self.gru = nn.GRU(32, 64, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(self.embedding(x))
        return self.head(out[:, -1])


@dataclass
class Workload:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    losses: Callable[[nn.Module, Tensor, Tensor], Tensor]
    kind: str  # "mtl" or "iwrm"

    def mean_loss(self) -> Tensor:
        return self.losses(self.model, self.x, self.y).mean()


def make(name: str, size: int, seed: int = 0) -> Workload:
    """``make("W1", m)``, ``make("W2", batch)``, ``make("W3", batch)``, ``make("W4", batch)``,
    ``make("W5", batch)`` (sequences of 16 tokens)."""
    torch.manual_seed(seed)
    if name == "W1":
        model = MTLNet(size)
        x, y = torch.randn(128, 64), torch.randn(128, size)
        return Workload(
            f"W1 m={size}", model, x, y, lambda mdl, a, b: ((mdl(a) - b) ** 2).mean(0), "mtl"
        )
    if name == "W2":
        model = nn.Sequential(
            nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        x, y = torch.randn(size, 32), torch.randint(0, 10, (size,))
    elif name == "W3":
        model = cnn()
        x, y = torch.randn(size, 3, 32, 32), torch.randint(0, 10, (size,))
    elif name in ("W4", "W5"):
        model = TransformerNet() if name == "W4" else GRUNet()
        x, y = torch.randint(0, 100, (size, 16)), torch.randint(0, 5, (size,))
    else:
        raise ValueError(name)
    return Workload(
        f"{name} B={size}",
        model,
        x,
        y,
        lambda mdl, a, b: F.cross_entropy(mdl(a), b, reduction="none"),
        "iwrm",
    )


def median_ms(step: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def plain_step(w: Workload) -> Callable[[], None]:
    opt = torch.optim.SGD(w.model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        w.mean_loss().backward()
        opt.step()

    return step


def torchjd_steps(w: Workload) -> dict[str, Callable[[], None]]:
    """torchjd 0.18's UPGrad variants for this workload (empty if torchjd is not installed)."""
    try:
        from torchjd.aggregation import UPGrad, UPGradWeighting
        from torchjd.autogram import Engine
        from torchjd.autojac import backward, jac_to_grad, mtl_backward
    except ImportError:
        return {}
    params = list(w.model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    steps: dict[str, Callable[[], None]] = {}

    def jacobian_all() -> None:
        opt.zero_grad()
        backward(w.losses(w.model, w.x, w.y))
        jac_to_grad(params, UPGrad())
        opt.step()

    steps["autojac"] = jacobian_all
    # The autogram engine hooks its model for good: give it a copy of its own.
    gram_model = copy.deepcopy(w.model)
    gram_opt = torch.optim.SGD(gram_model.parameters(), lr=1e-3)
    try:
        engine = Engine(gram_model, batch_dim=0 if w.kind == "iwrm" else None)
    except ValueError:  # autogram refuses some modules (RNNs) with a batch_dim
        return steps
    weighting = UPGradWeighting()

    def autogram() -> None:
        gram_opt.zero_grad()
        losses = w.losses(gram_model, w.x, w.y)
        losses.backward(weighting(engine.compute_gramian(losses)))
        gram_opt.step()

    steps["autogram"] = autogram
    if w.kind == "mtl":
        shared = list(w.model.encoder.parameters())

        def mtl() -> None:
            opt.zero_grad()
            features = w.model.encoder(w.x)
            losses = [
                ((head(features)[:, 0] - w.y[:, k]) ** 2).mean()
                for k, head in enumerate(w.model.heads)
            ]
            mtl_backward(losses, features=features)
            jac_to_grad(shared, UPGrad())
            opt.step()

        steps["mtl_backward"] = mtl
    return steps
