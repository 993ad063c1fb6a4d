"""Layer-wise engine: exact against brute-force per-sample gradients, fallbacks, errors, compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jdoptim.gramian import _layers
from jdoptim.gramian.layerwise import LayerwiseGramianEngine

from ._exact import assert_matches_jacobian

STRATEGIES = ["auto", "ghost", "materialize"]


def assert_exact(model: nn.Module, inputs: tuple, loss_fn, strategy: str, **engine_kw) -> dict:
    """Gramian and weighted gradient of the engine == brute force, to 1e-10 relative (float64)."""
    model = model.double()
    engine = LayerwiseGramianEngine(model, strategy=strategy, **engine_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = loss_fn(model(*inputs))
    assert_matches_jacobian(engine.compute(losses, params, retain_graph=True), losses, params)
    report = engine.report()
    engine.remove()
    return report


def mse(out: Tensor) -> Tensor:
    return (out**2).flatten(1).sum(1)


class TwoTasks(nn.Module):
    def forward(self, out: Tensor) -> Tensor:
        flat = out.flatten(1)
        return torch.stack([(flat**2).sum(1), torch.sin(flat).sum(1)], dim=1)


def seq_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


CASES = {
    "mlp": (seq_model, lambda: (torch.randn(6, 5),), mse),
    "mlp_tasks": (seq_model, lambda: (torch.randn(5, 5),), TwoTasks()),
    "sequence": (seq_model, lambda: (torch.randn(4, 9, 5),), mse),
    "sequence_tasks": (seq_model, lambda: (torch.randn(3, 4, 5),), TwoTasks()),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 6, (2, 3), groups=2, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(6, 2, 1, bias=False),
        ),
        lambda: (torch.randn(5, 3, 7, 6),),
        mse,
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3, padding="same", dilation=2),
            nn.Tanh(),
            nn.Conv1d(4, 4, 2, groups=4, padding=1, padding_mode="circular", stride=2),
        ),
        lambda: (torch.randn(5, 3, 9),),
        TwoTasks(),
    ),
    "conv_dilated": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, dilation=2, padding="same"), nn.Tanh()),
        lambda: (torch.randn(3, 2, 6, 7),),
        mse,
    ),
    "embedding": (
        lambda: nn.Sequential(nn.Embedding(6, 4, padding_idx=1), nn.LayerNorm(4), nn.Linear(4, 3)),
        # few indices over many positions: repeated indices within and across samples
        lambda: (torch.randint(0, 6, (5, 7)),),
        mse,
    ),
    "embedding_tasks": (
        lambda: nn.Sequential(nn.Embedding(6, 4, padding_idx=1), nn.Linear(4, 3)),
        lambda: (torch.randint(0, 6, (4, 5)),),
        TwoTasks(),
    ),
    "norms": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.InstanceNorm2d(4, affine=True),
            nn.BatchNorm2d(4).eval(),
        ),
        lambda: (torch.randn(4, 2, 5, 5),),
        mse,
    ),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_against_brute_force(case: str, strategy: str) -> None:
    torch.manual_seed(0)
    make, inputs, loss_fn = CASES[case]
    model = make()
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    report = assert_exact(model, x, loss_fn, strategy)
    assert "generic" not in report.values()  # every layer here has a dedicated rule


class Shared(nn.Module):
    """One Linear called twice (cross terms between calls), a tied embedding / linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t: Tensor) -> Tensor:
        h = self.emb(t)
        h = self.lin(torch.tanh(self.lin(h)))
        return self.head(h)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shared_and_tied_layers(strategy: str) -> None:
    torch.manual_seed(1)
    assert_exact(Shared(), (torch.randint(0, 5, (4, 3)),), mse, strategy)


class Custom(nn.Module):
    """Parameters no rule covers: a raw parameter, an uncalled sub-module used by parameter, a
    Linear applied to a tensor shared by all samples; and MultiheadAttention (its module rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.unused_call = nn.Linear(4, 4)  # its weight is used directly, never called
        self.shared = nn.Linear(3, 4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.basis = nn.Parameter(torch.randn(2, 3))
        self.both = nn.Linear(4, 4)  # called per sample and on a shared tensor

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.scale + self.shared(self.basis).sum(0)  # `shared` sees no batch
        h = torch.nn.functional.linear(h, self.unused_call.weight)
        h = self.both(h) + self.both(self.basis @ self.shared.weight.T).sum(0)
        return self.mha(h, h, h, need_weights=False)[0]


def test_fallback_is_exact() -> None:
    torch.manual_seed(2)
    report = assert_exact(Custom(), (torch.randn(3, 5, 4),), mse, "auto")
    assert report["mha"] == "attention"


def test_batch_dim_1() -> None:
    """Sequence-first inputs [T, B, d] and losses [K, B]: Gramian in the losses' order."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 2)).double()

    def loss_fn(out: Tensor) -> Tensor:  # [T, B, 2] -> [2, B]
        return torch.stack([(out**2).sum((0, 2)), out.sum((0, 2))])

    assert_exact(model, (torch.randn(3, 4, 4, dtype=torch.float64),), loss_fn, "auto", batch_dim=1)


@pytest.mark.parametrize("hooks", [False, True])
def test_layer_norm_input_from_the_graph(monkeypatch, hooks: bool) -> None:
    """LayerNorm's normalised input comes from its call's saved mean and deviation (eager, no
    saved-tensor hooks), else from a second layer norm; exact either way (2-D normalised
    shape, batch_dim=1, two losses per sample)."""
    found: list[bool] = []
    real = _layers._layer_norm_from_graph

    def spy(*args):
        out = real(*args)
        found.append(out is not None)
        return out

    monkeypatch.setattr(_layers, "_layer_norm_from_graph", spy)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(-1, (2, 3)), nn.LayerNorm((2, 3)),
                          nn.Flatten(-2), nn.Tanh(), nn.Linear(6, 2))  # fmt: skip

    def loss_fn(out: Tensor) -> Tensor:  # [T, B, 2] -> [2, B]
        return torch.stack([(out**2).sum((0, 2)), torch.sin(out).sum((0, 2))])

    x = (torch.randn(3, 5, 4, dtype=torch.float64),)
    if hooks:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert_exact(model, x, loss_fn, "auto", batch_dim=1)
    else:
        assert_exact(model, x, loss_fn, "auto", batch_dim=1)
    assert found == [not hooks]


def test_layer_norm_input_modified_in_place_raises() -> None:
    """The graph path forms LayerNorm's normalised input after the engine's backward: an input
    changed in place after the forward pass raises (a LayerNorm on the data, whose node that
    backward does not run, so autograd itself would not notice)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)).double()
    engine = LayerwiseGramianEngine(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    losses = (model(x) ** 2).sum(1)
    x.mul_(2)
    with pytest.raises(ValueError, match="modified in place"):
        engine.compute(losses, list(model.parameters()))
    engine.remove()


def test_outputs_and_norm_inputs_released_before_the_blocks(monkeypatch) -> None:
    """Eagerly, what the factors do not need is let go before the Gramian's blocks are formed:
    a layer's output (read only by the backward) and a LayerNorm's input (its per-sample
    gradients are formed by then)."""
    import gc
    import weakref

    from jdoptim.gramian import layerwise

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 2))
    engine = LayerwiseGramianEngine(model)
    alive: list[tuple[bool, bool]] = []
    real = layerwise.scaled_gram

    def spy(*args):
        norms = [o for o in gc.get_objects() if type(o) is _layers.NormalizedInput]
        alive.append((h_ref() is not None, bool(norms)))
        return real(*args)

    monkeypatch.setattr(layerwise, "scaled_gram", spy)
    h = model[0](torch.randn(5, 4))
    losses = (model[3](model[2](model[1](h))) ** 2).sum(1)
    h_ref = weakref.ref(h)
    del h
    engine.compute(losses, list(model.parameters()))
    assert alive == [(False, False)]
    engine.remove()


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 5),
    T=st.integers(1, 4),
    d=st.integers(1, 6),
    p=st.integers(1, 6),
    bias=st.booleans(),
    ghost=st.booleans(),
)
def test_linear_random_sizes(B: int, T: int, d: int, p: int, bias: bool, ghost: bool) -> None:
    torch.manual_seed(B * 1000 + T * 100 + d * 10 + p)
    model = nn.Sequential(nn.Linear(d, p, bias=bias))
    strategy = "ghost" if ghost else "materialize"
    assert_exact(model, (torch.randn(B, T, d, dtype=torch.float64),), mse, strategy)


def test_ghost_or_materialise_rule() -> None:
    """T = 1 picks the ghost route; a convolution with many positions materialises."""
    from jdoptim.gramian._layers import LinearFactor

    dense = LinearFactor(0, 1, torch.zeros(1, 64, 1, 128), torch.zeros(1, 64, 1, 1, 128))
    ghost, mat = dense.costs()
    assert ghost < mat
    conv = LinearFactor(0, 1, torch.zeros(1, 32, 900, 27), torch.zeros(1, 32, 1, 900, 16))
    ghost, mat = conv.costs()
    assert mat < ghost


def _assert_same_gram(formed, factor, dims, shift: int | None) -> None:
    """``formed``'s Gramian equals the ghost ``factor``'s and its stored gradients' (scaled by
    ``2^-shift``), and is the unscaled one times ``4^-shift``."""
    from jdoptim.gramian._layers import PerSample

    s = None if shift is None else torch.tensor(shift, dtype=torch.int32)
    G = formed.gram(dims, s)
    torch.testing.assert_close(G, factor.gram(dims, s), rtol=1e-12, atol=0)
    stored = PerSample(factor.materialize()).gram(dims, s)
    torch.testing.assert_close(G, stored, rtol=1e-12, atol=0)
    if shift:
        torch.testing.assert_close(G * 4.0**shift, formed.gram(dims, None), rtol=1e-12, atol=0)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("shift", [None, 0, 7, -5])
def test_formed_factor_equals_stored_and_ghost(shift: int | None) -> None:
    """A factor whose per-sample gradients are formed per block and dropped gives the ghost's
    and the stored gradients' Gramian (scaled by 2^-shift) and the same weighted gradient; few
    positions per sample pick it, a convolution's many positions keep the gradients."""
    from jdoptim.gramian._layers import Dims, FormedLinearFactor, LinearFactor, PerSample
    from jdoptim.gramian.layerwise import formed_cheaper

    f = LinearFactor(0, 1, torch.randn(2, 3, 4, 5) * 8, torch.randn(2, 3, 2, 4, 6) / 3)
    dims = Dims(B=3, K=2, batch_dim=0)
    s = None if shift is None else torch.tensor(shift, dtype=torch.int32)
    formed = FormedLinearFactor.of(f)
    _assert_same_gram(formed, f, dims, shift)
    w = torch.randn(3, 2)
    stored = PerSample(f.materialize()).weighted(w)
    for i, g in formed.weighted(w).items():
        torch.testing.assert_close(g, stored[i], rtol=1e-12, atol=1e-12)
    assert formed_cheaper(f)
    # Without bias, 1024 numbers per gradient (a zero input column is added): the same.
    f = LinearFactor(0, None, torch.randn(1, 3, 4, 32) * 8, torch.randn(1, 3, 2, 4, 32) / 3)
    G = FormedLinearFactor.of(f).gram(dims, s)
    torch.testing.assert_close(G, PerSample(f.materialize()).gram(dims, s), rtol=1e-12, atol=0)
    conv = LinearFactor(0, 1, torch.zeros(1, 32, 900, 27), torch.zeros(1, 32, 1, 900, 16))
    assert not formed_cheaper(conv)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("shift", [None, 0, 7, -5])
def test_formed_embedding_factor_equals_stored_and_ghost(shift: int | None) -> None:
    """An embedding factor whose per-sample gradients are formed per block and dropped gives
    the ghost's and the stored gradients' Gramian (scaled by 2^-shift) and the same weighted
    gradient; prepare_factors picks it where the materialised route is cheaper."""
    from jdoptim.gramian._layers import Dims, EmbeddingFactor, FormedEmbeddingFactor, PerSample
    from jdoptim.gramian.layerwise import prepare_factors

    idx = torch.tensor([[0, 3, 3, 1], [2, 2, 0, 4], [4, 1, 1, 1]])
    f = EmbeddingFactor(0, idx, torch.randn(3, 2, 4, 5) * 8, 6)
    dims = Dims(B=3, K=2, batch_dim=0)
    formed = FormedEmbeddingFactor.of(f)
    _assert_same_gram(formed, f, dims, shift)
    for K in (2, 1):
        g = EmbeddingFactor(0, idx, f.D[:, :K], 6)
        w = torch.randn(3, K)
        stored = PerSample(g.materialize()).weighted(w)
        torch.testing.assert_close(g.weighted(w)[0], stored[0], rtol=1e-12, atol=1e-12)
    ghost, mat = f.costs()
    assert mat < ghost
    (picked,) = prepare_factors([f], PerSample({}), "auto")
    assert isinstance(picked, FormedEmbeddingFactor)


def test_backward_accumulates_like_autograd() -> None:
    torch.manual_seed(4)
    model = seq_model()
    engine = LayerwiseGramianEngine(model)
    x = torch.randn(6, 5)
    params = list(model.parameters())
    losses = mse(model(x))
    w = torch.rand(6)
    expected = torch.autograd.grad((w * losses).sum(), params, retain_graph=True)
    for p in params:
        p.grad = torch.ones_like(p)
    engine.compute(losses, params).backward(w)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g + 1, rtol=1e-5, atol=1e-6)
    assert engine._records == []  # stash cleared


def test_flattened_losses_raise() -> None:
    """Flat [B K] losses are not guessed to be [B, K] (they may be a flattened [K, B]): their
    dimension 0 has a size that no layer saw as the batch, which raises."""
    torch.manual_seed(5)
    model = seq_model()
    engine = LayerwiseGramianEngine(model)
    params = list(model.parameters())
    x = torch.randn(4, 5)
    assert engine.compute(TwoTasks()(model(x)), params).gramian.shape == (8, 8)
    with pytest.raises(ValueError, match="cannot be the batch"):
        engine.compute(TwoTasks()(model(x)).flatten(), params)


def test_batchnorm_in_training_mode_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    engine = LayerwiseGramianEngine(model)
    losses = mse(model(torch.randn(5, 3)))
    with pytest.raises(ValueError, match="mix the samples"):
        engine.compute(losses, list(model.parameters()))
    model.eval()
    engine.compute(mse(model(torch.randn(5, 3))), list(model.parameters()))


def test_inplace_modification_raises_unless_cloned() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    params = list(model.parameters())
    engine = LayerwiseGramianEngine(model)
    with pytest.raises(ValueError, match="modified in place"):
        engine.compute(mse(model(torch.randn(5, 3))), params)
    engine.remove()
    assert_exact(model, (torch.randn(5, 3, dtype=torch.float64),), mse, "auto", clone_outputs=True)


def test_no_grad_forward_is_not_recorded_and_reset() -> None:
    model = seq_model()
    engine = LayerwiseGramianEngine(model)
    with torch.no_grad():
        model(torch.randn(2, 5))
    assert engine._records == []
    model(torch.randn(2, 5))
    assert len(engine._records) == 2
    engine.reset()
    assert engine._records == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_dim": -1}, "batch_dim"),
        ({"batch_dim": 1.0}, "batch_dim"),
        ({"strategy": "fast"}, "strategy"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerwiseGramianEngine(seq_model(), **kwargs)
    with pytest.raises(ValueError, match="at least one module"):
        LayerwiseGramianEngine()


def test_bad_weights_and_losses() -> None:
    model = seq_model()
    engine = LayerwiseGramianEngine(model, batch_dim=2)
    with pytest.raises(ValueError, match="batch dimension"):
        engine.compute(mse(model(torch.randn(3, 5))), list(model.parameters()))
    engine = LayerwiseGramianEngine(model)
    result = engine.compute(mse(model(torch.randn(3, 5))), list(model.parameters()))
    with pytest.raises(ValueError, match="Expected 3 weights"):
        result.weighted_gradient(torch.ones(4))


class Small(nn.Module):
    """``conv`` over 70 positions: per-sample gradients stored, formed in chunks of samples;
    ``pool`` over 9: formed per block and dropped (with 2 losses per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.pool = nn.Conv1d(4, 4, 3, stride=8)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, t: Tensor) -> Tensor:
        h = self.pool(torch.tanh(self.conv(self.emb(t).transpose(1, 2)))).transpose(1, 2)
        return self.head(torch.tanh(self.norm(h))).mean(1)


def test_compile_fullgraph_matches_eager(monkeypatch) -> None:
    # Chunks of 2 samples of `conv`'s patches (70 positions x 12 float32 each), the last one
    # partial (B = 5).
    monkeypatch.setattr(_layers, "CONV_CHUNK_BYTES", 2 * 70 * 12 * 4)
    torch.manual_seed(7)
    model = Small()
    params = list(model.parameters())
    engine = LayerwiseGramianEngine(model)

    def step(t: Tensor, y: Tensor) -> Tensor:
        losses = (model(t) - y) ** 2  # [B, 2]: two losses per sample
        result = engine.compute(losses, params)
        w = torch.softmax(result.gramian.diagonal(), 0)
        result.backward(w)
        return result.gramian

    t, y = torch.randint(0, 7, (5, 70)), torch.randn(5, 2)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        G_eager = step(t, y)
        g_eager = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        explained = torch._dynamo.explain(step)(t, y)
        assert explained.graph_break_count == 0
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)
        G = compiled(t, y)
        torch.testing.assert_close(G, G_eager, rtol=1e-5, atol=1e-6)
        for p, g in zip(params, g_eager, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        assert engine._records == []
        model.zero_grad(set_to_none=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(torch.randint(0, 7, (5, 70)), torch.randn(5, 2))


def test_graph_freed_unless_retained_or_needed_by_the_fallback() -> None:
    """Like ``backward()``, ``compute`` frees the graph of the losses by default (the rules
    need nothing of it after their backward), keeps it with ``retain_graph=True``, and never
    frees it before the exact fallback has run (a parameter used outside its module)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = LayerwiseGramianEngine(model)
    params = list(model.parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    for retain in (False, True):
        losses = model(x).square().sum(1)
        engine.compute(losses, params, retain_graph=retain)
        if retain:
            losses.sum().backward()
        else:
            with pytest.raises(RuntimeError, match="second time"):
                losses.sum().backward()
    # The first layer's weight also used outside its module: exact fallback, same Gramian.
    losses = model(x).square().sum(1) + (x @ params[0].T).sum(1)
    result = engine.compute(losses, params, retain_graph=True)
    assert_matches_jacobian(result, losses, params)
    losses = model(x).square().sum(1) + (x @ params[0].T).sum(1)
    G = engine.compute(losses, params).gramian
    torch.testing.assert_close(G, result.gramian)
    engine.remove()
