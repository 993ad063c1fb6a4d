"""torch.compile: the JD part is one graph, compiled == eager, no recompilation, fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from jdoptim import JDOptimizer, NonFiniteError
from jdoptim.aggregation import UPGradWeighting

from ._helpers import InverseNormWeighting, assert_same, data, mlp, snapshot, task_losses


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _setup(weighting, inner=lambda p: torch.optim.Adam(p, lr=0.01), **kwargs):
    model = mlp()
    return model, JDOptimizer(inner(model.parameters()), weighting, **kwargs)


def test_jd_backward_is_one_graph_and_matches_eager_and_defers_the_finite_check():
    model_e, opt_e = _setup(UPGradWeighting())
    model_c, opt_c = _setup(UPGradWeighting())

    def make_jd_part(model, opt):
        def jd_part(x, y, scale):
            return opt.backward(task_losses(model, x, y) * scale)

        return jd_part

    x, y = data()
    one = torch.ones(())
    explained = torch._dynamo.explain(make_jd_part(model_c, opt_c))(x, y, one)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    opt_c._record.pending_ok = None

    compiled = torch.compile(make_jd_part(model_c, opt_c), fullgraph=True)
    eager = make_jd_part(model_e, opt_e)
    for seed in range(2):
        x, y = data(seed=seed)
        opt_c.zero_grad()
        opt_e.zero_grad()
        w_c, w_e = compiled(x, y, one), eager(x, y, one)
        torch.testing.assert_close(w_c, w_e, rtol=1e-5, atol=1e-6)
        for p, q in zip(model_c.parameters(), model_e.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        opt_c.step()
        opt_e.step()
    # Non-finite losses under compile: no sync in the graph, the gradients are written masked
    # (unchanged) and the next step() raises with everything untouched.
    compiled(x, y, one)
    before = snapshot(model_c, opt_c)
    compiled(x, y, torch.full((), float("nan")))
    assert_same(before, snapshot(model_c, opt_c))
    with pytest.raises(NonFiniteError):
        opt_c.step()
    assert_same(before, snapshot(model_c, opt_c))


def test_whole_train_step_compiles_without_recompilation_and_follows_eager():
    model_e, opt_e = _setup(UPGradWeighting(), nonfinite="propagate")
    model_c, opt_c = _setup(UPGradWeighting(), nonfinite="propagate")

    def make_step(model, opt):
        def train_step(x, y):
            opt.zero_grad()
            return opt.step(task_losses(model, x, y))

        return train_step

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(make_step(model_c, opt_c), backend=counter)
    eager = make_step(model_e, opt_e)
    frames = None
    for step in range(20):
        x, y = data(seed=step)
        w_c, w_e = compiled(x, y), eager(x, y)
        torch.testing.assert_close(w_c, w_e, rtol=1e-5, atol=1e-5)
        if step == 0:
            frames = counter.frame_count
    assert counter.frame_count == frames  # no recompilation after the first step
    for p, q in zip(model_c.parameters(), model_e.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_losses_from_outside_the_compiled_region_fall_back_to_eager():
    model_e, opt_e = _setup(InverseNormWeighting())
    model_c, opt_c = _setup(InverseNormWeighting())
    x, y = data()
    w_c = torch.compile(opt_c.backward)(task_losses(model_c, x, y))
    w_e = opt_e.backward(task_losses(model_e, x, y))
    torch.testing.assert_close(w_c, w_e)
    for p, q in zip(model_c.parameters(), model_e.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_separately_compiled_model_gets_a_clear_error():
    model, opt = _setup(InverseNormWeighting())
    compiled_model = torch.compile(model)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="Compile the whole train step"):
        opt.step(task_losses(compiled_model, *data()))
    assert_same(before, snapshot(model, opt))
