"""JDOptimizer with a loss-level Scalarizer: one ordinary backward of the scalarized loss."""

from __future__ import annotations

import copy

import pytest
import torch

from jdoptim import JDOptimizer, NonFiniteError
from jdoptim.scalarization import DWA, FAMO, IMTLL, UW, Mean, Sum


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    return model, (lambda m: ((m(x) - y) ** 2).mean(0))


def test_step_is_the_plain_step_of_the_scalarized_loss() -> None:
    model, losses_of = _setup()
    twin = copy.deepcopy(model)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), FAMO(3))
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    famo = FAMO(3)
    for _ in range(3):
        opt.zero_grad()
        assert opt.step(losses_of(model)) is None
        plain.zero_grad()
        famo(losses_of(twin)).backward()
        plain.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt.engine is None and opt.last_gramian is None


def test_famo_update_through_the_closure_equals_the_manual_loop() -> None:
    model, losses_of = _setup()
    twin = copy.deepcopy(model)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), FAMO(3))
    manual = JDOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), FAMO(3))
    for _ in range(3):
        opt.zero_grad()
        opt.step(closure=lambda: losses_of(model))
        manual.zero_grad()
        manual.step(losses_of(twin))
        with torch.no_grad():
            manual.update_scalarizer(losses_of(twin))
    torch.testing.assert_close(opt.weighting.logits, manual.weighting.logits, rtol=0, atol=0)
    assert bool(opt.weighting.logits.abs().sum() > 0)
    with pytest.raises(TypeError, match="has no `update`"):
        JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Sum()).update_scalarizer(
            torch.ones(3)
        )


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_trainable_scalarizer_parameters_join_a_param_group(cls) -> None:
    model, losses_of = _setup()
    scalarizer = cls(3)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scalarizer)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["params"][0] is next(scalarizer.parameters())
    opt.zero_grad()
    opt.step(losses_of(model))
    assert bool(next(scalarizer.parameters()).abs().sum() > 0)
    # Already held by the optimiser: not added twice.
    inner = torch.optim.SGD([*model.parameters(), *scalarizer.parameters()], lr=0.1)
    assert len(JDOptimizer(inner, scalarizer).param_groups) == 1


@pytest.mark.parametrize("make", [lambda: FAMO(3), lambda: DWA(), lambda: UW(3)])
def test_checkpoint_holds_the_scalarizer_state(make) -> None:
    model, losses_of = _setup()
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), make())

    def run(o: JDOptimizer, m: torch.nn.Module, n: int) -> None:
        for _ in range(n):
            o.zero_grad()
            o.step(closure=lambda: losses_of(m))
            if isinstance(o.weighting, DWA):
                o.weighting.step()

    run(opt, model, 3)
    twin = copy.deepcopy(model)
    restored = JDOptimizer(torch.optim.Adam(twin.parameters(), lr=0.01), make())
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, model, 2)
    run(restored, twin, 2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_nonfinite_scalarized_loss_leaves_grads_untouched() -> None:
    model, _ = _setup()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean())
    before = [p.detach().clone() for p in model.parameters()]
    bad = model(torch.full((2, 4), float("nan"))).mean(0)
    with pytest.raises(NonFiniteError):
        opt.step(bad)
    assert all(p.grad is None for p in model.parameters())
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="partial JD"):
        JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean(), params=[model.weight])
