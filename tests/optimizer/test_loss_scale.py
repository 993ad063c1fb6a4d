"""JD on 2^k L is 2^k times JD on L (float32), for every k that keeps the plain gradient finite:
the Gramian no longer overflows (no NonFiniteError at 1e20 and beyond), for every engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import MeanWeighting, UPGradWeighting
from jdoptim.gramian import MultiTaskGramianEngine

ENGINES = ["jacobian", "layerwise", "multitask"]


def grads_for(engine: str, weighting, k: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    kwargs: dict = {}
    if engine == "layerwise":
        kwargs = {"model": model, "batch_dim": 0, "engine": "layerwise"}
    elif engine == "multitask":
        kwargs = {"engine": MultiTaskGramianEngine(trunk, heads)}
    else:
        kwargs = {"engine": "jacobian"}
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), weighting, **kwargs)
    z = trunk(x)
    out = torch.cat([h(z) for h in heads], dim=1)  # [B, 3]
    per_sample = (out - y) ** 2
    losses = per_sample if engine == "layerwise" else per_sample.mean(0)
    opt.zero_grad()
    opt.backward(losses * 2.0**k)
    assert torch.isfinite(opt.last_gramian).all()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("weighting", "ks"),
    [(UPGradWeighting(), [20, 66, 100, 120]), (MeanWeighting(), [-100, -40, 66, 120])],
    ids=["upgrad", "mean"],
)
def test_update_scales_with_the_losses(engine: str, weighting, ks: list[int]) -> None:
    reference = grads_for(engine, weighting, 0)
    for k in ks:
        for g, ref in zip(grads_for(engine, weighting, k), reference, strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.double(), ref.double() * 2.0**k, rtol=1e-6, atol=0)


def test_single_loss_at_a_huge_scale() -> None:
    """A 0-d loss (an ordinary backward) whose squared gradient norm overflows float32."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), UPGradWeighting())
    x = torch.randn(4, 3)
    opt.zero_grad()
    opt.backward(model(x).pow(2).mean())
    reference = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    opt.backward(model(x).pow(2).mean() * 2.0**100)
    assert torch.isfinite(opt.last_gramian).all()
    for p, ref in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad.double(), ref.double() * 2.0**100, rtol=0, atol=0)
