"""The generic per-module rule (``vmap`` of a module's own vjp): exact, checked, used.

Every case equals the brute-force Jacobian Gramian (float64, 1e-10 relative). Where the rule must
apply, the engine's whole-model fallback is made to raise; modules that mix samples, or that
``vmap`` cannot run, take the exact fallback (eager) or poison the Gramian with NaN where the
check cannot be read on the host.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jdoptim import JDOptimizer, NonFiniteError
from jdoptim.aggregation import UPGradWeighting
from jdoptim.gramian import LayerwiseGramianEngine, layerwise

from ._exact import assert_matches_jacobian, no_fallback

B, T, E = 5, 4, 6


pytestmark = pytest.mark.usefixtures("float64_default")


def check(model: nn.Module, losses_fn, *, claimed: bool = True, **kw) -> LayerwiseGramianEngine:
    engine = LayerwiseGramianEngine(model, **kw)
    if claimed:
        no_fallback(engine)
    losses = losses_fn()
    params = [p for p in model.parameters() if p.requires_grad]
    result = engine.compute(losses, params, retain_graph=True)
    assert_matches_jacobian(result, losses, params)
    return engine


# ------------------------------------------------------------------------------- modules


class ScaleBias(nn.Module):
    """A parent owning parameters around a child Linear (the child keeps its own rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(E, E)
        self.scale = nn.Parameter(torch.randn(E))
        self.shift = nn.Parameter(torch.randn(E))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.scale + self.shift


class Positional(nn.Module):
    def __init__(self, n: int = 10) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n, E))

    def forward(self, x: Tensor, seq_dim: int = 1) -> Tensor:
        pos = self.pos[: x.shape[seq_dim]]
        return x + (pos if seq_dim == 1 else pos[:, None])


class Attention(nn.Module):
    """Attention from F.scaled_dot_product_attention with its own parameters (no Linear)."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.w_qkv = nn.Parameter(torch.randn(3 * E, E) / E**0.5)
        self.w_o = nn.Parameter(torch.randn(E, E) / E**0.5)
        self.b_o = nn.Parameter(torch.randn(E))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (x @ self.w_qkv.T).split(E, -1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        causal = mask is None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return o.transpose(1, 2).reshape(b, t, E) @ self.w_o.T + self.b_o


class Mixing(nn.Module):
    """Not per-sample: centres over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(E))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0, keepdim=True)) * self.p


class ZeroMixing(nn.Module):
    """Mixes samples through a coefficient that is zero: the outputs are per-sample, the
    gradient of ``a`` is not (only the first-order check sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(E))
        self.a = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.p + self.a * x.mean(0, keepdim=True)


class Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, E)
        self.block = block
        self.head = nn.Linear(E, 3)

    def forward(self, t: Tensor, **kw) -> Tensor:
        return self.head(torch.tanh(self.block(self.emb(t), **kw)))


def _tokens() -> Tensor:
    return torch.randint(0, 9, (B, T))


def per_sample(model: Net, t: Tensor, **kw) -> Tensor:
    return model(t, **kw).pow(2).sum((1, 2))


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("block", ["scale_bias", "positional", "attention_causal"])
def test_claimed_and_exact(block: str) -> None:
    make = {"scale_bias": ScaleBias, "positional": Positional, "attention_causal": Attention}
    model, t = Net(make[block]()), _tokens()
    engine = check(model, lambda: per_sample(model, t))
    assert engine.report()["block"] == "vmap"


def test_attention_with_float_mask() -> None:
    """A causal additive mask given as an input shared by all samples (not batched)."""
    model, t = Net(Attention()), _tokens()
    mask = torch.full((T, T), float("-inf")).triu(1)
    check(model, lambda: per_sample(model, t, mask=mask))


def test_prelu_channels() -> None:
    """nn.PReLU with one slope per channel: dimension 1, in a conv net (batch of one kept)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(B, 2, 4, 4)
    engine = check(model, lambda: model(x).pow(2).sum(1))
    assert engine.report()["1"] == "vmap"


def test_bilinear_two_inputs() -> None:
    bil, head = nn.Bilinear(3, 4, E), nn.Linear(E, 2)
    model = nn.ModuleList([bil, head])
    x1, x2 = torch.randn(B, 3), torch.randn(B, 4)
    check(model, lambda: head(torch.tanh(bil(x1, x2))).pow(2).sum(1))


def test_nested_parents() -> None:
    """Parameters at two levels, every child a Linear: each level counts its own parameters."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.gate = ScaleBias(), nn.Parameter(torch.randn(E))
            self.out = nn.Linear(E, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.sigmoid(self.gate) * self.inner(x) + x)

    model = Outer()
    x = torch.randn(B, T, E)
    engine = check(model, lambda: model(x).pow(2).sum((1, 2)))
    report = engine.report()
    assert report["Outer"] == "vmap" and report["inner"] == "vmap"
    assert report["inner.lin"] == "linear" and report["out"] == "linear"


class Tied(nn.Module):
    """The parent's own parameter is also its child Linear's weight (counted once per use)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(E, E)
        self.w = self.lin.weight

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)) @ self.w


def test_parameter_tied_to_a_child() -> None:
    model, t = Net(Tied()), _tokens()
    check(model, lambda: per_sample(model, t))


def test_multi_losses_and_shared_calls() -> None:
    """[B, K] losses; the module called twice (its calls sum)."""
    block = ScaleBias()
    model = nn.ModuleList([block, nn.Linear(E, 2)])
    x = torch.randn(B, T, E)
    check(model, lambda: model[1](block(torch.tanh(block(x)))).pow(2).sum(1))


def test_batch_dim_1() -> None:
    """Sequence-first [T, B, E] with the engine's batch_dim=1, [K, B] losses."""
    pos, head = Positional(), nn.Linear(E, 2)
    model = nn.ModuleList([pos, head])
    x = torch.randn(T, B, E)

    def losses() -> Tensor:
        return head(pos(x, seq_dim=0)).pow(2).sum(0).T  # [2, B]

    check(model, losses, batch_dim=1)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunks(chunk: int) -> None:
    model, t = Net(Attention()), _tokens()
    torch.manual_seed(3)
    engine = check(model, lambda: per_sample(model, t), chunk_size=chunk)
    assert f"chunk_size={chunk}" in repr(engine)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 5),
    T=st.integers(1, 4),
    K=st.integers(1, 3),
    batch_dim=st.integers(0, 1),
    chunk=st.sampled_from([None, 1, 2]),
)
def test_random_sizes(B: int, T: int, K: int, batch_dim: int, chunk: int | None) -> None:
    """Batch of one sample, one position, several losses per sample, either batch dimension,
    chunks that do not divide the batch."""
    torch.manual_seed(B * 100 + T * 10 + K)
    block, head = ScaleBias(), nn.Linear(E, K)
    model = nn.ModuleList([block, head])
    x = torch.randn(B, T, E) if batch_dim == 0 else torch.randn(T, B, E)

    def losses() -> Tensor:
        out = torch.tanh(head(block(x))).pow(2)  # [B, T, K] or [T, B, K]
        return out.sum(1 - batch_dim) if batch_dim == 0 else out.sum(0).T  # [B, K] or [K, B]

    check(model, losses, batch_dim=batch_dim, chunk_size=chunk)


# ------------------------------------------------------------------------------- safety


def _mixing_net() -> tuple[nn.Module, Tensor]:
    # First in the model: the layers before a mixing module would see non-separable losses.
    return nn.Sequential(Mixing(), nn.Tanh(), nn.Linear(E, 3)), torch.randn(B, T, E)


def test_mixing_module_falls_back_exactly() -> None:
    """The layers before the mixing module (the embedding) would be wrong too: every parameter
    takes the exact fallback, in this step and the next ones."""
    model, t = Net(Mixing()), _tokens()
    engine = check(model, lambda: per_sample(model, t), claimed=False)
    assert engine.report()["block"].startswith("generic (outputs differ")
    model.emb.weight.data.mul_(2)
    losses = per_sample(model, t)
    assert type(engine._records[1]).__name__ == "_Inexact"  # the verdict is kept
    params = list(model.parameters())
    assert_matches_jacobian(engine.compute(losses, params, retain_graph=True), losses, params)


def test_mixing_through_a_zero_coefficient_falls_back_exactly() -> None:
    model, t = Net(ZeroMixing()), _tokens()
    engine = check(model, lambda: per_sample(model, t), claimed=False)
    assert engine.report()["block"].startswith("generic (per-sample gradients do not sum")


def test_zero_coefficient_and_outside_use_without_host_read_are_nan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No host read and no autograd graph (as under torch.compile): the first-order check
    poisons the Gramian for mixing through a zero coefficient and for a parameter of the module
    that the losses also use outside it (undetectable from the graph there)."""
    monkeypatch.setattr(layerwise, "host_readable", lambda flag: False)
    monkeypatch.setattr(layerwise, "graph_visible", lambda: False)
    model, t = Net(ZeroMixing()), _tokens()
    engine = LayerwiseGramianEngine(model)
    assert engine.compute(per_sample(model, t), list(model.parameters())).gramian.isnan().all()

    model, t = Net(ScaleBias()), _tokens()
    engine = LayerwiseGramianEngine(model)
    losses = per_sample(model, t) + (model.emb(t) * model.block.scale).sum((1, 2))
    assert engine.compute(losses, list(model.parameters())).gramian.isnan().all()
    model, t = Net(ScaleBias()), _tokens()
    engine = LayerwiseGramianEngine(model)
    assert not engine.compute(per_sample(model, t), list(model.parameters())).gramian.isnan().any()


def test_mixing_module_without_host_read_is_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the check cannot be read (compiled, accelerators): NaN, and JDOptimizer raises."""
    monkeypatch.setattr(layerwise, "host_readable", lambda flag: False)
    model, x = _mixing_net()
    engine = LayerwiseGramianEngine(model)
    result = engine.compute(model(x).pow(2).sum((1, 2)), list(model.parameters()))
    assert result.gramian.isnan().all()

    model, x = _mixing_net()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting(),
                      model=model, batch_dim=0)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError):
        opt.step(model(x).pow(2).sum((1, 2)))
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)

    # A separable module is unaffected by the no-host-read route.
    model, t = Net(ScaleBias()), _tokens()
    check(model, lambda: per_sample(model, t))


def test_meta_device_reads_no_data() -> None:
    """No host read where the check cannot be read: the whole computation runs on "meta"."""
    for block in (ScaleBias(), Mixing()):
        model = Net(block).to("meta")
        engine = LayerwiseGramianEngine(model)
        t = torch.zeros(B, T, dtype=torch.long, device="meta")
        result = engine.compute(per_sample(model, t), list(model.parameters()))
        assert result.gramian.shape == (B, B) and result.gramian.device.type == "meta"
        assert engine.report()["block"] == "vmap"


class Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(E))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x * self.p, 0.5, training=True)


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(E))

    def forward(self, x: Tensor) -> Tensor:  # the branch depends on the whole batch
        return x * self.p if x.sum() > 0 else x * self.p**2


class RunningNorm(nn.Module):
    """A hand-written batch norm: batch statistics and an in-place running mean (vmap fails
    on the in-place update; calls on single samples show the mixing)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(E))
        self.register_buffer("running", torch.zeros(E))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean((0, 1))
        self.running.mul_(0.9).add_(0.1 * mean)
        return (x - mean) * self.w


class StatefulNorm(RunningNorm):
    """Normalises with the running mean it has just updated (state changed by the call)."""

    def forward(self, x: Tensor) -> Tensor:
        self.running.mul_(0.9).add_(0.1 * x.mean((0, 1)))
        return (x - self.running) * self.w


@pytest.mark.parametrize("block", [Dropped, Branching, RunningNorm, StatefulNorm])
def test_vmap_failure_falls_back_exactly(block: type[nn.Module]) -> None:
    """After the embedding: ``vmap`` fails; calls on single samples show that the module mixes
    samples (every parameter takes the fallback) or is random (its own parameters do, like the
    GRU case of test_children_with_module_rules)."""
    model, t = Net(block()), _tokens()
    engine = check(model, lambda: per_sample(model, t), claimed=False)
    report = engine.report()["block"]
    assert report.startswith("generic (vmap failed")
    assert ("every parameter" in report) == (block is not Dropped)
    assert ("random" in report) == (block is Dropped)
    if block in (RunningNorm, StatefulNorm):  # the probes worked on copies of the buffer
        torch.testing.assert_close(
            model.block.running, 0.1 * model.emb(t).mean((0, 1)), rtol=1e-12, atol=1e-12
        )


class Gated(nn.Module):
    """A parent's own gate around a child that has a module rule."""

    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.gate, self.child = nn.Parameter(torch.randn(E)), child

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.gate
        if isinstance(self.child, nn.GRU):
            return self.child(h)[0]
        return self.child(h, h, h, need_weights=False)[0]


def test_children_with_module_rules() -> None:
    """An attention child runs inside the parent's recomputation; a GRU child does not run
    under functional_call + vmap: the parent's gate falls back exactly, with the reason."""
    model, t = Net(Gated(nn.MultiheadAttention(E, 2, batch_first=True))), _tokens()
    engine = check(model, lambda: per_sample(model, t))
    assert engine.report()["block"] == "vmap"
    model = Net(Gated(nn.GRU(E, E, batch_first=True)))
    engine = check(model, lambda: per_sample(model, t), claimed=False)
    assert engine.report()["block"].startswith("generic (vmap failed: RuntimeError")
    assert "every parameter" not in engine.report()["block"]
    assert engine.report()["block.child"] == "recurrent"


def test_parameter_used_outside_falls_back_exactly() -> None:
    model, t = Net(ScaleBias()), _tokens()
    check(model, lambda: per_sample(model, t) + (model.emb(t) * model.block.scale).sum((1, 2)),
          claimed=False)  # fmt: skip


def test_compile_fullgraph_matches_eager() -> None:
    """The rule inside one compiled graph (float32, like training)."""
    torch.set_default_dtype(torch.float32)
    model = nn.Sequential(Positional(), ScaleBias(), nn.Linear(E, 2))
    params = list(model.parameters())
    engine = LayerwiseGramianEngine(model)
    no_fallback(engine)

    def step(x: Tensor) -> Tensor:
        result = engine.compute(model(x).pow(2).sum((1, 2)), params)
        result.backward(torch.softmax(result.gramian.diagonal(), 0))
        return result.gramian

    x = torch.randn(3, T, E)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        G_eager = step(x)
        g_eager = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        G = torch.compile(step, fullgraph=True)(x)
    torch.testing.assert_close(G, G_eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(params, g_eager, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert engine._records == []


def test_compiled_mixing_module_is_nan() -> None:
    """A compiled step (no host read, no eager verdict yet) poisons the Gramian with NaN."""
    torch.set_default_dtype(torch.float32)
    model, x = _mixing_net()
    engine = LayerwiseGramianEngine(model)

    def step(x: Tensor) -> Tensor:
        return engine.compute(model(x).pow(2).sum((1, 2)), list(model.parameters())).gramian

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        torch._dynamo.reset()
        G = torch.compile(step, fullgraph=True)(x)
    assert G.isnan().all()
    assert not step(x).isnan().any()  # eager: the exact fallback
