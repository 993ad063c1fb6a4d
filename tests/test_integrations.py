"""JDOptimizer inside Hugging Face Accelerate (CPU, one process). Lightning is exercised by
``examples/lightning_manual.py`` (tests/test_examples.py) and torch.distributed.checkpoint by
tests/optimizer/test_state_dict.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import MeanWeighting, STCHWeighting
from jdoptim.integrations import accelerate_backward

accelerate = pytest.importorskip("accelerate")  # in the test extra; skipped only without it
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: start and leave them clean."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def build(weighting=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    weighting = STCHWeighting(warmup_steps=2) if weighting is None else weighting
    return model, JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), weighting)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)


def losses_of(model, step):
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean(0)


def test_save_state_and_load_state_carry_the_jd_state(tmp_path):
    accelerator = accelerate.Accelerator(cpu=True)
    model, jd = build()
    model, optimizer = accelerator.prepare(model, jd)
    assert optimizer.optimizer is jd

    def train(steps):
        for s in steps:
            accelerate_backward(accelerator, optimizer, losses_of(model, s))
            optimizer.step()
            optimizer.zero_grad()

    train(range(3))
    assert set(optimizer.state_dict()) == {"state", "param_groups", "jdoptim"}
    accelerator.save_state(str(tmp_path))
    train(range(3, 6))
    reference = [p.detach().clone() for p in model.parameters()]
    assert int(jd.weighting.step) == 6

    accelerator.load_state(str(tmp_path))
    assert int(jd.weighting.step) == 3 and bool(jd.weighting.has_nadir)
    train(range(3, 6))
    for p, q in zip(model.parameters(), reference, strict=True):
        assert torch.equal(p, q)


def test_gradient_accumulation_matches_a_plain_loop():
    accumulation = 3
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, optimizer = accelerator.prepare(*build())
    ref_model, ref = build()
    for s in range(2 * accumulation):
        with accelerator.accumulate(model):
            w = accelerate_backward(accelerator, optimizer, losses_of(model, s))
            optimizer.step()
            optimizer.zero_grad()
        ref.backward(losses_of(ref_model, s) / accumulation)
        if (s + 1) % accumulation == 0:
            ref.step()
            ref.zero_grad()
        torch.testing.assert_close(w, ref.last_weights)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p, q)
    assert int(optimizer.optimizer.weighting.step) == 2 * accumulation


def test_the_accelerated_optimizer_steps_with_a_closure():
    """AcceleratedOptimizer.step(closure) calls `optimizer.step(closure)` positionally."""
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*build(MeanWeighting()))
    ref_model, ref = build(MeanWeighting())
    optimizer.step(lambda: losses_of(model, 0))
    ref.step(losses_of(ref_model, 0))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="not both"):
        ref.step(lambda: losses_of(ref_model, 0), closure=lambda: losses_of(ref_model, 0))


def test_the_loss_scale_is_applied_and_needs_nonfinite_propagate():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    accelerator = SimpleNamespace(gradient_accumulation_steps=2, scaler=scaler)
    model, jd = build(MeanWeighting())
    with pytest.raises(ValueError, match="propagate"):
        accelerate_backward(accelerator, jd, losses_of(model, 0))
    assert all(p.grad is None for p in model.parameters())

    jd.nonfinite = "propagate"
    twin = copy.deepcopy(model)
    accelerate_backward(accelerator, jd, losses_of(model, 0))
    losses_of(twin, 0).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad * 8.0 / 2)


def test_bad_optimizers_and_deepspeed_are_refused():
    model, jd = build(MeanWeighting())
    accelerator = SimpleNamespace(gradient_accumulation_steps=1, scaler=None)
    with pytest.raises(TypeError, match="JDOptimizer"):
        accelerate_backward(accelerator, torch.optim.SGD(model.parameters(), lr=0.1), model[0].bias)
    deepspeed = SimpleNamespace(
        gradient_accumulation_steps=1, scaler=None, distributed_type=DistributedType.DEEPSPEED
    )
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        accelerate_backward(deepspeed, jd, losses_of(model, 0))
