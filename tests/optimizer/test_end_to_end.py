"""End to end with UPGrad: every objective decreases and no step conflicts with any of them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad, UPGradWeighting


def _assert_no_conflict(opt: JDOptimizer) -> None:
    # The update d = J^T w has inner product (J d)_i = (G w)_i with every gradient g_i.
    G, w = opt.last_gramian.double(), opt.last_weights.double().reshape(-1)
    slack = 2e-4 * float(G.trace()) * float(w.abs().max()) + 1e-7  # UPGrad's reg_eps = 1e-4
    assert bool(((G @ w) >= -slack).all()), (G @ w).min()


class _MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


def test_multi_task_training_with_upgrad():
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    w_true = torch.randn(6, 3)
    w_true[:, 1] = -w_true[:, 0] + 0.3 * torch.randn(6)  # tasks 0 and 1 conflict
    y = torch.tanh(x @ w_true)
    model = _MultiTask()
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=3e-3), UPGrad())

    def losses(idx: Tensor | slice = slice(None)) -> Tensor:
        return ((model(x[idx]) - y[idx]) ** 2).mean(0)

    with torch.no_grad():
        initial = losses()
    for _ in range(300):
        idx = torch.randint(0, 128, (32,))
        opt.zero_grad()
        opt.step(losses(idx))
        _assert_no_conflict(opt)
    with torch.no_grad():
        final = losses()
    assert bool((final < 0.5 * initial).all()), (initial, final)


def test_per_sample_iwrm_training_with_upgrad():
    torch.manual_seed(1)
    x = torch.randn(16, 4)
    y = x @ torch.randn(4, 1) + 0.5
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), UPGradWeighting())

    def per_sample_losses() -> Tensor:
        return ((model(x) - y) ** 2).squeeze(1)  # IWRM: one objective per sample

    with torch.no_grad():
        initial = per_sample_losses()
    for _ in range(200):
        opt.zero_grad()
        opt.step(per_sample_losses())
        _assert_no_conflict(opt)
    with torch.no_grad():
        final = per_sample_losses()
    assert bool((final < initial).all()), (initial - final).min()
    assert float(final.mean()) < 0.05 * float(initial.mean())
