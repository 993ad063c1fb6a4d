"""A layer rule claims a parameter only when it differentiates exactly that parameter.

Pruned, weight-normed, spectral-normed and parametrised layers, subclasses that compute something
else, forward (pre-)hooks, and parameters also used outside their module's call (tied weights,
``F.linear`` on another module's weight) must fall back exactly: the layer-wise and multi-task
engines equal the Jacobian engine (float64, 1e-10 relative), and every parameter gets a gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize, prune

from jdoptim.gramian import JacobianEngine, LayerwiseGramianEngine, MultiTaskGramianEngine

from ._exact import _flat


def _old_weight_norm(m: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of the parametrizations version
        return torch.nn.utils.weight_norm(m)


class _Symmetric(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).mT


def _parametrized(m: nn.Module) -> nn.Module:
    parametrize.register_parametrization(m, "weight", _Symmetric())
    return m


def _pruned(m: nn.Module) -> nn.Module:
    torch.manual_seed(5)
    return prune.random_unstructured(m, "weight", amount=0.4)


VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "prune": _pruned,
    "weight_norm_old": _old_weight_norm,
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm_old": torch.nn.utils.spectral_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "parametrize": _parametrized,
}


def assert_same_as_jacobian(engine, losses: Tensor, params: list[Tensor]) -> None:
    """The engine's Gramian and weighted gradient == the Jacobian engine's (float64)."""
    result = engine.compute(losses, params, retain_graph=True)
    reference = JacobianEngine().compute(losses.reshape(-1), params, retain_graph=True)
    G = reference.gramian
    torch.testing.assert_close(result.gramian, G, rtol=0, atol=1e-10 * G.abs().max())
    w = torch.randn(losses.numel(), dtype=torch.float64)
    got = _flat(result.weighted_gradient(w), params)
    expected = _flat(reference.weighted_gradient(w), params)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * expected.abs().max())
    # Every parameter that the losses reach gets a gradient (none silently frozen).
    for g_ref, g in zip(reference.weighted_gradient(w), result.weighted_gradient(w), strict=True):
        assert (g_ref is None) == (g is None)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def per_sample(model: nn.Module, x: Tensor) -> Tensor:
    return (model(x) ** 2).sum(-1)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layerwise_parametrised_layers(variant: str, when: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    if when == "before":
        VARIANTS[variant](model[0])
    engine = LayerwiseGramianEngine(model)
    if when == "after":  # parametrised once the engine is built: checked at every call
        VARIANTS[variant](model[0])
    params = list(model.parameters())
    assert_same_as_jacobian(
        engine, per_sample(model, torch.randn(5, 4, dtype=torch.float64)), params
    )
    if when == "before":
        assert engine.report()["0"] == "generic"
    engine.remove()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_multitask_parametrised_trunk(variant: str) -> None:
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh()).double()
    VARIANTS[variant](trunk[2])
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(3)).double()
    engine = MultiTaskGramianEngine(trunk, heads)
    z = trunk(torch.randn(6, 4, dtype=torch.float64))
    losses = torch.stack([(h(z) ** 2).mean() for h in heads])
    assert_same_as_jacobian(engine, losses, [*trunk.parameters(), *heads.parameters()])
    engine.remove()


class TimesTwo(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class StandardisedConv(nn.Conv2d):
    """Weight standardisation through ``_conv_forward`` (``forward`` is ``Conv2d``'s)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) * 0.5
        return super()._conv_forward(x, w, bias)


def test_subclasses_that_compute_something_else() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(TimesTwo(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    engine = LayerwiseGramianEngine(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_same_as_jacobian(engine, per_sample(model, x), list(model.parameters()))
    engine.remove()

    conv = nn.Sequential(StandardisedConv(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    conv = conv.double()
    engine = LayerwiseGramianEngine(conv)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    assert_same_as_jacobian(engine, per_sample(conv, x), list(conv.parameters()))
    assert engine.report()["0"] == "vmap"  # not the conv rule: the generic per-module rule
    engine.remove()


def test_forward_replaced_on_the_instance() -> None:
    torch.manual_seed(3)
    model = mlp()
    plain = model[0].forward
    model[0].forward = lambda x: plain(x) ** 2  # type: ignore[method-assign]
    engine = LayerwiseGramianEngine(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_same_as_jacobian(engine, per_sample(model, x), list(model.parameters()))
    engine.remove()


@pytest.mark.parametrize("kind", ["pre_hook", "hook_before", "global_hook"])
def test_hooks_that_change_the_call(kind: str) -> None:
    torch.manual_seed(4)
    model = mlp()
    handles = []
    if kind == "pre_hook":
        handles.append(model[2].register_forward_pre_hook(lambda m, args: (args[0] ** 2,)))
    elif kind == "hook_before":
        handles.append(model[2].register_forward_hook(lambda m, args, out: out.sin()))
    engine = LayerwiseGramianEngine(model)
    if kind == "global_hook":
        handles.append(
            nn.modules.module.register_module_forward_hook(
                lambda m, args, out: out * 1.5 if isinstance(m, nn.Linear) else None
            )
        )
    try:
        x = torch.randn(5, 4, dtype=torch.float64)
        assert_same_as_jacobian(engine, per_sample(model, x), list(model.parameters()))
    finally:
        for h in handles:
            h.remove()
        engine.remove()


class UsesAnotherWeight(nn.Module):
    """``F.linear`` on another module's weight, outside that module's call."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x)) + F.linear(x, self.a.weight)
        return self.b(h)


class TiedLinears(nn.Module):
    """Two Linear modules sharing one weight (different biases), and an embedding read by a
    plain ``F.embedding`` call with a Linear's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(torch.tanh(self.a(x)))
        idx = torch.arange(x.shape[0]) % 4
        return self.head(h) + F.embedding(idx, self.head.weight)


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("make", [UsesAnotherWeight, TiedLinears])
def test_weights_used_outside_their_call(make: type[nn.Module], strategy: str) -> None:
    torch.manual_seed(5)
    model = make().double()
    engine = LayerwiseGramianEngine(model, strategy=strategy)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_same_as_jacobian(engine, per_sample(model, x), list(model.parameters()))
    engine.remove()


def test_multitask_trunk_weight_read_by_a_head() -> None:
    torch.manual_seed(6)
    trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double()

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, z: Tensor) -> Tensor:
            return self.lin(z + F.linear(z, trunk[0].weight))

    heads = nn.ModuleList(Head() for _ in range(2)).double()
    engine = MultiTaskGramianEngine(trunk, heads)
    z = trunk(torch.randn(6, 4, dtype=torch.float64))
    losses = torch.stack([(h(z) ** 2).mean() for h in heads])
    assert_same_as_jacobian(engine, losses, [*trunk.parameters(), *heads.parameters()])
    engine.remove()


def test_plain_layers_keep_their_rules() -> None:
    """The checks do not send plain layers to the fallback (no outside use is found)."""
    from jdoptim.gramian._graph import used_outside

    torch.manual_seed(7)
    model = mlp()
    engine = LayerwiseGramianEngine(model)
    y = model[0](torch.randn(5, 4, dtype=torch.float64))
    out = model[2](torch.tanh(y))
    assert used_outside([out.sum()], [(y, None, list(model[0].parameters()))]) == set()
    assert set(engine.report().values()) == {"linear"}
    engine.remove()


def test_compiled_steps_keep_the_eager_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the graph is hidden (``graph_visible()`` is false): the verdict of
    the last eager step still sends the weight used outside its module to the fallback."""
    import jdoptim.gramian.layerwise as layerwise
    import jdoptim.gramian.multitask as multitask

    torch.manual_seed(8)
    model = UsesAnotherWeight().double()
    engine = LayerwiseGramianEngine(model)
    params = list(model.parameters())
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_same_as_jacobian(engine, per_sample(model, x), params)  # eager: the graph is read

    trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double()

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, z: Tensor) -> Tensor:
            return self.lin(z + F.linear(z, trunk[0].weight))

    heads = nn.ModuleList(Head() for _ in range(2)).double()
    mt = MultiTaskGramianEngine(trunk, heads)
    mt_params = [*trunk.parameters(), *heads.parameters()]

    def mt_losses() -> Tensor:
        z = trunk(torch.randn(6, 4, dtype=torch.float64))
        return torch.stack([(h(z) ** 2).mean() for h in heads])

    assert_same_as_jacobian(mt, mt_losses(), mt_params)

    monkeypatch.setattr(layerwise, "graph_visible", lambda: False)
    monkeypatch.setattr(multitask, "graph_visible", lambda: False)
    assert_same_as_jacobian(engine, per_sample(model, x), params)
    assert_same_as_jacobian(mt, mt_losses(), mt_params)
    engine.remove()
    mt.remove()
