"""Engine hooks and what they store go away with the optimizer/engine, or on ``close()``."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import MeanWeighting
from jdoptim.gramian import LayerwiseGramianEngine, MultiTaskGramianEngine


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _pending_forward(model: nn.Module) -> list[weakref.ref]:
    """Run a forward pass whose outputs no ``compute`` consumes; return weak references to the
    outputs of every ``nn.Linear`` (what an engine's hooks store)."""
    refs: list[weakref.ref] = []

    def probe(module: nn.Module, args: tuple, output: Tensor) -> None:
        refs.append(weakref.ref(output))

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(probe) for m in linears]
    model(torch.randn(32, 6))
    for handle in handles:
        handle.remove()
    assert len(refs) == len(linears)
    return refs


class _MTL(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16))
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def _layerwise_optimizer(model: nn.Module) -> JDOptimizer:
    return JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3), MeanWeighting(), model=model, batch_dim=0
    )


def _multitask_optimizer(model: _MTL) -> JDOptimizer:
    engine = MultiTaskGramianEngine(model.trunk, model.heads)
    return JDOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), MeanWeighting(), engine=engine)


def _run_layerwise(model: nn.Module, opt: JDOptimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(32, 6)
        opt.zero_grad()
        opt.step(model(x).pow(2).sum(1))


def _run_multitask(model: _MTL, opt: JDOptimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(32, 6)
        opt.zero_grad()
        opt.step(torch.stack([y.pow(2).mean() for y in model(x)]))


CASES = [
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 2)),
                 _layerwise_optimizer, _run_layerwise, id="layerwise"),
    pytest.param(_MTL, _multitask_optimizer, _run_multitask, id="multitask"),
]  # fmt: skip


@pytest.mark.parametrize(("make_model", "make_opt", "run"), CASES)
def test_repeated_constructions_leave_hooks_records_and_memory_flat(make_model, make_opt, run):
    torch.manual_seed(0)
    model = make_model()
    hooks, engines = [], []
    for _ in range(4):
        opt = make_opt(model)
        engines.append(weakref.ref(opt.engine))
        run(model, opt, 3)
        hooks.append(_hook_count(model))
        outputs = _pending_forward(model)  # stored by the engine's hooks ...
        assert any(ref() is not None for ref in outputs)
        del opt
        gc.collect()
        assert all(ref() is None for ref in outputs)  # ... and freed with it: memory stays flat
        assert _hook_count(model) == 0
    assert all(ref() is None for ref in engines)
    assert len(set(hooks)) == 1 and hooks[0] > 0


def test_engine_is_released_without_a_garbage_collection_pass():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = _layerwise_optimizer(model)
    _run_layerwise(model, opt, 1)
    outputs = _pending_forward(model)
    ref = weakref.ref(opt.engine)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del opt
        assert ref() is None  # reference counting alone frees it: no cycle through the model
        assert _hook_count(model) == 0
        assert all(r() is None for r in outputs)
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize(("make_model", "make_opt", "run"), CASES)
def test_close_removes_hooks_and_stored_records(make_model, make_opt, run):
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model)
    run(model, opt, 1)
    assert _hook_count(model) > 0
    outputs = _pending_forward(model)
    opt.close()
    assert _hook_count(model) == 0
    assert all(ref() is None for ref in outputs)  # the stored records are dropped
    opt.close()  # idempotent
    # Another optimizer on the same model works as if the first had never existed.
    second = make_opt(model)
    run(model, second, 1)
    assert _hook_count(model) > 0


def test_close_on_an_engine_without_hooks_is_a_no_op():
    model = nn.Linear(3, 2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MeanWeighting())
    opt.close()
    opt.step(model(torch.randn(4, 3)).pow(2).mean(0))


def test_an_engine_the_user_holds_stays_hooked_until_removed():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    engine = LayerwiseGramianEngine(model)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MeanWeighting(), engine=engine)
    hooks = _hook_count(model)
    del opt
    gc.collect()
    assert _hook_count(model) == hooks > 0
    engine.remove()
    assert _hook_count(model) == 0
