"""JDOptimizer in eager mode: the step pipeline, torch.optim compatibility and bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer, NonFiniteError
from jdoptim.aggregation import (
    Aggregator,
    ConstantWeighting,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    SumWeighting,
)
from jdoptim.aggregation.flattening import flatten_generalized_gramian
from jdoptim.gramian import JacobianEngine

from ._helpers import (
    CountingWeighting,
    InverseNormWeighting,
    assert_same,
    data,
    jacobian_rows,
    mlp,
    snapshot,
    task_losses,
)


def _pair(inner, weighting=None, **kwargs):
    """A model with a JDOptimizer, and an identical model with the plain inner optimizer."""
    a, b = mlp(), mlp()
    jd = JDOptimizer(inner(a.parameters()), weighting or MeanWeighting(), **kwargs)
    return a, jd, b, inner(b.parameters())


INNER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
}


@pytest.mark.parametrize("name", INNER)
def test_mean_weighting_equals_inner_optimizer_on_the_mean_loss(name):
    # JD with uniform weights 1/m is ordinary training on the mean loss: same trajectory.
    a, jd, b, plain = _pair(INNER[name])
    for step in range(4):
        x, y = data(seed=step)
        jd.zero_grad()
        w = jd.step(task_losses(a, x, y))
        plain.zero_grad()
        task_losses(b, x, y).mean().backward()
        plain.step()
        torch.testing.assert_close(w, torch.full((3,), 1 / 3))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert jd.state is jd.optimizer.state and len(jd.state) == len(plain.state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        for key, value in plain.state[q].items():
            torch.testing.assert_close(jd.state[p][key], value, rtol=1e-5, atol=1e-6)


def test_step_writes_the_weighted_gradient_and_monitoring():
    model = mlp()
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.5), InverseNormWeighting())
    x, y = data()
    losses = task_losses(model, x, y)
    J = jacobian_rows(losses, params)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    w = opt.step(losses)
    G = J @ J.T
    torch.testing.assert_close(opt.last_gramian, G, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, torch.rsqrt(G.diagonal() + 1), rtol=1e-5, atol=1e-6)
    assert opt.last_weights is w and not w.requires_grad
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(grad, w @ J, rtol=1e-5, atol=1e-6)
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after, before - 0.5 * (w @ J), rtol=1e-5, atol=1e-6)


def test_param_groups_state_and_defaults_are_the_inner_objects():
    model = mlp()
    inner = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.01},
        ]
    )
    opt = JDOptimizer(inner, MeanWeighting())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    x, y = data()
    opt.step(task_losses(model, x, y))
    assert len(inner.state) == 4 and all(int(s["step"]) == 1 for s in inner.state.values())
    new = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [new], "lr": 1.0})
    assert inner.param_groups[-1]["params"][0] is new


def test_param_groups_with_different_learning_rates():
    model = mlp()
    p0 = [p.detach().clone() for p in model.parameters()]
    inner = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=0.1
    )
    JDOptimizer(inner, InverseNormWeighting()).step(task_losses(model, *data()))
    after = list(model.parameters())
    assert torch.equal(after[0], p0[0]) and torch.equal(after[1], p0[1])
    assert not torch.equal(after[2], p0[2])


def test_frozen_and_unreached_parameters_keep_their_grad():
    model = mlp()
    model[0].bias.requires_grad_(False)
    unreached = nn.Parameter(torch.ones(3))
    unreached.grad = torch.full((3,), 7.0)
    opt = JDOptimizer(
        torch.optim.SGD([*model.parameters(), unreached], lr=0.1), InverseNormWeighting()
    )
    frozen_before = model[0].bias.detach().clone()
    opt.backward(task_losses(model, *data()))
    assert model[0].bias.grad is None and torch.equal(model[0].bias, frozen_before)
    assert torch.equal(unreached.grad, torch.full((3,), 7.0))
    assert model[0].weight.grad is not None


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=6),
    ],
    ids=["StepLR", "CosineAnnealingLR", "OneCycleLR"],
)
def test_lr_schedulers_drive_the_inner_optimizer(make):
    a, jd, b, plain = _pair(INNER["sgd-momentum-nesterov"])
    s_jd, s_plain = make(jd), make(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(5):
            x, y = data(seed=step)
            jd.zero_grad()
            jd.step(task_losses(a, x, y))
            s_jd.step()
            plain.zero_grad()
            task_losses(b, x, y).mean().backward()
            plain.step()
            s_plain.step()
            assert jd.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_backward_then_clip_then_step():
    a, jd, b, plain = _pair(INNER["sgd"], InverseNormWeighting())
    x, y = data()
    w = jd.backward(task_losses(a, x, y))
    task_losses(b, x, y).backward(w)  # reference: same weighted gradient
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    norm = nn.utils.clip_grad_norm_(a.parameters(), 0.01)
    nn.utils.clip_grad_norm_(b.parameters(), 0.01)
    assert norm > 0.01
    assert jd.step() is None
    plain.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_sums_per_call_directions():
    model = mlp()
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.1), InverseNormWeighting())
    expected = torch.zeros(sum(p.numel() for p in params))
    for seed in range(3):
        losses = task_losses(model, *data(seed=seed))
        J = jacobian_rows(losses, params)
        w = opt.backward(losses)
        expected += w @ J
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_scalar_loss_is_an_ordinary_backward():
    a, jd, b, _ = _pair(INNER["sgd"], InverseNormWeighting())
    x, y = data()
    w = jd.backward(task_losses(a, x, y).sum())
    task_losses(b, x, y).sum().backward()
    assert w.shape == () and float(w) == 1.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    sq = sum(float(q.grad.square().sum()) for q in b.parameters())
    torch.testing.assert_close(float(jd.last_gramian), sq, rtol=1e-5, atol=0)


class _RowSums(GeneralizedWeighting):
    """Test-local generalized weighting: W[a] = sum_b G[a, b] (shape of the first half)."""

    def forward(self, gg: Tensor, /) -> Tensor:
        k = gg.ndim // 2
        return flatten_generalized_gramian(gg).sum(1).reshape(gg.shape[:k])


def test_matrix_of_losses_uses_the_generalized_gramian():
    model = mlp()
    params = list(model.parameters())
    x, y = data()
    losses = (model(x) - y) ** 2  # [16, 3]: one loss per sample and output
    J = jacobian_rows(losses, params)
    G = J @ J.T
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.1), _RowSums())
    w = opt.backward(losses)
    assert w.shape == (16, 3)
    torch.testing.assert_close(w.reshape(-1), G.sum(1), rtol=1e-4, atol=1e-5)
    # A plain Weighting is wrapped in Flattening: same weights as on the flat [48, 48] Gramian.
    opt2 = JDOptimizer(torch.optim.SGD(params, lr=0.1), InverseNormWeighting())
    w2 = opt2.backward((model(x) - y) ** 2)
    torch.testing.assert_close(w2.reshape(-1), torch.rsqrt(G.diagonal() + 1), rtol=1e-4, atol=0)


class _Median(Aggregator):
    """Test-local Jacobian-only aggregator: the coordinate-wise median of the rows."""

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.median(dim=0).values


def test_aggregators():
    model = mlp()
    params = list(model.parameters())
    x, y = data()
    J = jacobian_rows(task_losses(model, x, y), params)
    # Gramian-weighted aggregator: through its gramian_weighting.
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.1), GramianWeightedAggregator(InverseNormWeighting())
    )
    w = opt.backward(task_losses(model, x, y))
    torch.testing.assert_close(w, torch.rsqrt((J @ J.T).diagonal() + 1), rtol=1e-5, atol=0)
    # Weighted (matrix) aggregator: weights from the Jacobian.
    opt.zero_grad()
    opt2 = JDOptimizer(torch.optim.SGD(params, lr=0.1), Mean())
    torch.testing.assert_close(opt2.backward(task_losses(model, x, y)), torch.full((3,), 1 / 3))
    # Jacobian-only aggregator: its output is .grad, there are no weights.
    opt.zero_grad()
    opt3 = JDOptimizer(torch.optim.SGD(params, lr=0.1), _Median())
    assert opt3.backward(task_losses(model, x, y)) is None
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, J.median(dim=0).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["weighted", "sum"])
def test_partial_jd(mode):
    model = mlp()
    shared, head = list(model[0].parameters()), list(model[2].parameters())
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        InverseNormWeighting(),
        params=shared,
        other_params_grad=mode,
    )
    x, y = data()
    losses = task_losses(model, x, y)
    J = jacobian_rows(losses, shared)
    w = opt.backward(losses)
    torch.testing.assert_close(opt.last_gramian, J @ J.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.cat([p.grad.reshape(-1) for p in shared]), w @ J, rtol=1e-5, atol=1e-6
    )
    coeff = w if mode == "weighted" else torch.ones(3)
    expected = torch.autograd.grad(task_losses(model, x, y), head, grad_outputs=coeff)
    for p, e in zip(head, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_closure_and_step_hooks():
    a, jd, b, plain = _pair(INNER["adam"])
    calls = []
    jd.register_step_pre_hook(lambda *args: calls.append("pre"))
    jd.register_step_post_hook(lambda *args: calls.append("post"))
    x, y = data()

    def closure():
        jd.zero_grad()
        return task_losses(a, x, y)

    w = jd.step(closure=closure)
    plain.zero_grad()
    task_losses(b, x, y).mean().backward()
    plain.step()
    assert calls == ["pre", "post"] and w.shape == (3,)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="either"):
        jd.step(task_losses(a, x, y), closure=closure)


def test_checkpoint_resume_gives_the_same_trajectory():
    def make():
        model = mlp()
        return model, JDOptimizer(
            torch.optim.AdamW(model.parameters(), lr=0.01), CountingWeighting()
        )

    def train(model, opt, steps):
        for s in steps:
            opt.zero_grad()
            opt.step(task_losses(model, *data(seed=s)))

    ref_model, ref_opt = make()
    train(ref_model, ref_opt, range(8))

    model, opt = make()
    train(model, opt, range(4))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert saved["opt"]["jdoptim"]["weighting"]["calls"] == 4
    fresh_model, fresh_opt = make()
    fresh_model.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    assert int(fresh_opt.weighting.calls) == 4
    train(fresh_model, fresh_opt, range(4, 8))
    for p, q in zip(ref_model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_autocast_bf16_on_cpu():
    model = mlp()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), InverseNormWeighting())
    x, y = data()
    w32 = opt.backward(task_losses(model, x, y))
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task_losses(model, x, y)
    w16 = opt.backward(losses)
    assert opt.last_gramian.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(w16, w32, rtol=0.05, atol=0.0)


def test_grad_scaler_semantics():
    a, jd, b, plain = _pair(INNER["sgd"], nonfinite="propagate")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x, y = data(seed=step)
        jd.zero_grad()
        jd.backward(scaler.scale(task_losses(a, x, y)))
        scaler.step(jd)
        scaler.update()
        plain.zero_grad()
        task_losses(b, x, y).mean().backward()
        plain.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # An overflow: the scaler sees the inf gradients, skips the step and lowers the scale.
    before = [p.detach().clone() for p in a.parameters()]
    jd.zero_grad()
    jd.backward(scaler.scale(task_losses(a, x, y) * float("inf")))
    scaler.step(jd)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before, strict=True))


def _trained_adam():
    model = mlp()
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), InverseNormWeighting())
    opt.step(task_losses(model, *data()))
    opt.zero_grad()
    opt.backward(task_losses(model, *data(seed=5)))  # leaves non-zero grads to protect
    return model, opt


@pytest.mark.parametrize(
    "make_losses, error, match",
    [
        (lambda m: task_losses(m, *data()).detach(), ValueError, "does not require grad"),
        (lambda m: task_losses(m, *data())[:0], ValueError, "empty"),
        (lambda m: task_losses(m, *data()) * float("nan"), NonFiniteError, "NaN or inf"),
        (lambda m: task_losses(m, *data()) + float("inf"), NonFiniteError, "NaN or inf"),
        (lambda m: task_losses(m, *data()).sum() * float("nan"), NonFiniteError, "NaN or inf"),
        (lambda m: [task_losses(m, *data())], TypeError, "should be a Tensor"),
    ],
)
def test_bad_losses_raise_and_change_nothing(make_losses, error, match):
    model, opt = _trained_adam()
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step(make_losses(model))
    assert_same(before, snapshot(model, opt))


def test_weighting_that_cannot_handle_the_shape_changes_nothing():
    model, opt = _trained_adam()
    bad = JDOptimizer(opt.optimizer, ConstantWeighting(torch.ones(2)))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="rows"):
        bad.step(task_losses(model, *data()))
    assert_same(before, snapshot(model, opt))

    class WrongShape(ConstantWeighting):
        def forward(self, stat, /):
            return self.weights

    wrong = JDOptimizer(opt.optimizer, WrongShape(torch.ones(2)))
    with pytest.raises(ValueError, match="weights of shape"):
        wrong.step(task_losses(model, *data()))
    assert_same(before, snapshot(model, opt))


def test_skip_policy_skips_the_step_and_changes_nothing():
    model, _ = _trained_adam()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = JDOptimizer(inner, SumWeighting(), nonfinite="skip")
    opt.step(task_losses(model, *data()))
    before = snapshot(model, opt)
    w = opt.step(task_losses(model, *data()) * float("nan"))
    assert torch.isnan(w).all() and opt.skipped_steps == 1
    assert_same(before, snapshot(model, opt))
    # A skipped backward also skips the following step() (the gradients are stale).
    opt.backward(task_losses(model, *data()) * float("nan"))
    opt.step()
    assert opt.skipped_steps == 2
    assert_same(before, snapshot(model, opt))
    opt.step(task_losses(model, *data()))
    assert opt.skipped_steps == 2 and not torch.equal(before["params"][0], model[0].weight)


def test_constructor_validation():
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        JDOptimizer(model, MeanWeighting())
    with pytest.raises(TypeError, match="Weighting"):
        JDOptimizer(inner, lambda g: g)
    with pytest.raises(TypeError, match="already"):
        JDOptimizer(JDOptimizer(inner, MeanWeighting()), MeanWeighting())
    with pytest.raises(ValueError, match="nonfinite"):
        JDOptimizer(inner, MeanWeighting(), nonfinite="ignore")
    with pytest.raises(ValueError, match="other_params_grad"):
        JDOptimizer(inner, MeanWeighting(), other_params_grad="mean")
    with pytest.raises(ValueError, match="parameter of `optimizer`"):
        JDOptimizer(inner, MeanWeighting(), params=[nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="non-empty"):
        JDOptimizer(inner, MeanWeighting(), params=[])
    with pytest.raises(ValueError, match="no weights"):
        JDOptimizer(inner, _Median(), params=list(model[0].parameters()))
    with pytest.raises(ValueError, match="chunk_size"):
        JDOptimizer(inner, MeanWeighting(), chunk_size=0)
    opt = JDOptimizer(inner, MeanWeighting(), engine=JacobianEngine(chunk_size=2))
    assert "JacobianEngine(chunk_size=2)" in repr(opt)
