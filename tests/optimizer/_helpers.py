"""Small models, losses and a test-local weighting shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jdoptim.aggregation import Weighting


class InverseNormWeighting(Weighting):
    r"""Test-local Gramian weighting :math:`w_i = 1 / \sqrt{G_{ii} + 1}` (depends on G only)."""

    def forward(self, stat: Tensor, /) -> Tensor:
        return torch.rsqrt(stat.diagonal() + 1.0)


class CountingWeighting(Weighting):
    """Mean weights, with a buffer counting calls (a stateful weighting for checkpoint tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, stat: Tensor, /) -> Tensor:
        self.calls += 1
        m = stat.shape[0]
        scale = 1.0 + 0.1 * (self.calls % 3).to(stat.dtype)
        return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device) * scale


def mlp(seed: int = 0, d_in: int = 5, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def data(seed: int = 1, n: int = 16, d_in: int = 5, d_out: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One MSE loss per output column: a vector of ``d_out`` losses."""
    return ((model(x) - y) ** 2).mean(0)


def jacobian_rows(losses: Tensor, params: list[Tensor]) -> Tensor:
    """Reference Jacobian ``[M, n]``, one plain backward per loss (retains the graph)."""
    rows = []
    for loss in losses.reshape(-1):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Deep copy of the parameters, their grads and the optimizer state (for 'unchanged')."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {
            id(p): {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
            for p, s in opt.state.items()
        },
    }


def assert_same(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for k, v in a["state"][key].items():
            w = b["state"][key][k]
            assert torch.equal(v, w) if isinstance(v, Tensor) else v == w
