"""``engine="auto"`` picks the layer-wise engine for per-sample losses; it gives the Jacobian
engine's gradients and weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from jdoptim import JDOptimizer
from jdoptim.aggregation import ConFIG, UPGradWeighting
from jdoptim.gramian import JacobianEngine, LayerwiseGramianEngine


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 5))


@pytest.mark.parametrize("make_model, x_shape", [(_mlp, (12, 7)), (_cnn, (6, 3, 8, 8))])
def test_auto_picks_layerwise_and_matches_jacobian_engine(make_model, x_shape) -> None:
    torch.manual_seed(0)
    model = make_model().double()
    twin = make_model().double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = torch.randint(0, 5, (x_shape[0],))

    fast = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting(), model=model, batch_dim=0
    )
    slow = JDOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), UPGradWeighting())
    assert isinstance(fast.engine, LayerwiseGramianEngine)
    assert isinstance(slow.engine, JacobianEngine)
    for _ in range(3):
        w_fast = fast.step(F.cross_entropy(model(x), y, reduction="none"))
        w_slow = slow.step(F.cross_entropy(twin(x), y, reduction="none"))
        torch.testing.assert_close(fast.last_gramian, slow.last_gramian, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(w_fast, w_slow, rtol=1e-7, atol=1e-9)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        fast.zero_grad()
        slow.zero_grad()


def test_auto_falls_back_to_jacobian_for_jacobian_only_aggregators() -> None:
    model = _mlp()
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), ConFIG(), model=model, batch_dim=0
    )
    assert isinstance(opt.engine, JacobianEngine)


def test_layerwise_by_name_needs_the_model() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="model"):
        JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting(), engine="layerwise"
        )
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGradWeighting(),
        engine="layerwise",
        model=model,
    )
    assert isinstance(opt.engine, LayerwiseGramianEngine)
