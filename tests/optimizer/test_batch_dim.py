"""``batch_dim`` applies to the losses' real shape: [B], [B, K], [K, B] and [T, B] losses give
the brute-force Jacobian's Gramian and update, and a dimension that cannot be the batch (or a
0-d loss, i.e. a forgotten ``reduction="none"``) raises before anything is written."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting
from jdoptim.gramian import JacobianEngine, LayerwiseGramianEngine

from ..gramian._exact import brute_force


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 2)).double()


def batch_first(net: nn.Module) -> Tensor:  # [B=4, 2]
    torch.manual_seed(1)
    return net(torch.randn(4, 3, dtype=torch.float64))


def seq_first(net: nn.Module) -> Tensor:  # [T=3, B=4, 2]
    torch.manual_seed(2)
    return net(torch.randn(3, 4, 3, dtype=torch.float64))


CASES = {
    "B": (batch_first, lambda out: (out**2).sum(-1), 0, "auto"),
    "B_K": (batch_first, lambda out: out**2 + out, 0, "auto"),
    "K_B_seq_first": (seq_first, lambda out: (out**2).sum(0).T, 1, "auto"),
    "T_B_seq_first": (seq_first, lambda out: (out**2).sum(-1), 1, "auto"),
    "K_B_batch_first": (batch_first, lambda out: torch.stack([out[:, 0] ** 2, out.sum(1)]), 1, 0),
    "T_B_jacobian": (seq_first, lambda out: (out**2).sum(-1), 1, "jacobian"),
}


def build(net: nn.Module, batch_dim: int, engine: str | int) -> JDOptimizer:
    if isinstance(engine, int):  # the model's batch dimension differs from the losses'
        engine = LayerwiseGramianEngine(net, batch_dim=engine)
    return JDOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1),
        UPGradWeighting(),
        model=net,
        batch_dim=batch_dim,
        engine=engine,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_gramian_and_update_match_the_jacobian(case: str) -> None:
    forward, loss_fn, batch_dim, engine = CASES[case]
    net = model()
    opt = build(net, batch_dim, engine)
    params = list(net.parameters())
    losses = loss_fn(forward(net))
    J = brute_force(losses, params)
    opt.zero_grad()
    weights = opt.backward(losses)
    assert weights.shape == losses.shape
    G = J @ J.T
    torch.testing.assert_close(opt.last_gramian, G, rtol=0, atol=1e-10 * G.abs().max())
    update = torch.cat([p.grad.flatten() for p in params])
    expected = weights.reshape(-1) @ J
    torch.testing.assert_close(update, expected, rtol=0, atol=1e-10 * expected.abs().max())


def wrong_k_b(out: Tensor) -> Tensor:  # [K=2, B=4] losses
    return (out**2).T


ERRORS = {
    # [K, B] losses declared with batch dimension 0: K is no batch the layers saw
    "K_B_dim0": (wrong_k_b, 0, "cannot be the batch"),
    # flattened [B K] losses: no layer saw a batch of 8
    "flattened": (lambda out: (out**2).flatten(), 0, "cannot be the batch"),
    # [K, B] losses of a batch-first model hooked along dimension 1 (its features)
    "K_B_hooked_dim1": (wrong_k_b, 1, "LayerwiseGramianEngine\\(model, batch_dim=0\\)"),
    # a mean over the batch: a forgotten reduction="none"
    "mean": (lambda out: (out**2).mean(), 0, 'reduction="none"'),
    "missing_dim": (lambda out: (out**2).sum(-1), 1, "no dimension batch_dim=1"),
}


def assert_refused(opt: JDOptimizer, net: nn.Module, losses: Tensor, match: str) -> None:
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=match):
        opt.step(losses)
    for p, b in zip(net.parameters(), before, strict=True):
        assert p.grad is None
        assert torch.equal(p, b)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_dimension_that_cannot_be_the_batch_raises(case: str) -> None:
    loss_fn, batch_dim, match = ERRORS[case]
    net = model()
    assert_refused(build(net, batch_dim, "auto"), net, loss_fn(batch_first(net)), match)


@pytest.mark.parametrize("case", ["mean", "missing_dim"])
def test_jacobian_engine_checks_the_dimension_too(case: str) -> None:
    loss_fn, batch_dim, match = ERRORS[case]
    net = model()
    assert_refused(build(net, batch_dim, "jacobian"), net, loss_fn(batch_first(net)), match)


def test_bad_batch_dim_argument() -> None:
    net = model()
    with pytest.raises(ValueError, match="batch_dim"):
        JDOptimizer(
            torch.optim.SGD(net.parameters(), lr=0.1), UPGradWeighting(), batch_dim=-1,
            engine=JacobianEngine(),
        )  # fmt: skip
