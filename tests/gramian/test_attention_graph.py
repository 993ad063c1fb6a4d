"""The attention rule without recomputation: ``Q``, ``K``, ``V`` gradients and ``out_proj``'s input
taken from the call's own autograd graph (eager, ``need_weights=False``).

Where the graph path must be taken, each call's captured quantities are compared with those of
the recomputation (float64, 1e-12) and the Gramian with the brute-force Jacobian's; a counter
makes the test fail if the rule silently recomputes instead (W4-like layers, float32 and
float64). Where the graph does not have the expected structure (math attention backend,
saved-tensor hooks, ``add_zero_attn``, a frozen ``out_proj``), the rule must recompute, exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from jdoptim.gramian import LayerwiseGramianEngine
from jdoptim.gramian import _modules as M

from ._exact import assert_matches_jacobian, no_fallback

pytestmark = pytest.mark.usefixtures("float64_default")

B, T, E = 4, 5, 8


class Paths:
    """Counts the calls that took each path; with ``compare``, checks the graph path's
    quantities against the recomputation's for every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, compare: bool = False) -> None:
        self.graph = self.recomputed = self.compared = 0
        from_graph, recompute = M._from_graph, M.AttentionRule._recompute

        def counted_from_graph(*args, **kwargs):
            found = from_graph(*args, **kwargs)
            self.graph += found is not None
            return found

        def counted_recompute(*args, **kwargs):
            self.recomputed += 1
            return recompute(*args, **kwargs)

        def factors(rule, module, pidx, saved, deltas, dims, want):
            if compare and deltas[0] is not None:
                grads = deltas[len(saved.outputs) :]
                found = from_graph(module, saved, grads, dims, deltas[0].dtype)
                assert found is not None, "the graph path was not taken"
                ref = recompute(module, saved, deltas, deltas[0], dims)
                for got, want_ in zip(found[:4], ref, strict=True):
                    assert got.shape == want_.shape
                    torch.testing.assert_close(got, want_, rtol=1e-12, atol=1e-12)
                if found[4] is not None:  # Q, K, V's gradients side by side
                    assert torch.equal(found[4], torch.cat(found[1:4], -1))
                self.compared += 1
            return original(rule, module, pidx, saved, deltas, dims, want)

        original = M.AttentionRule.factors
        monkeypatch.setattr(M, "_from_graph", counted_from_graph)
        monkeypatch.setattr(M.AttentionRule, "_recompute", staticmethod(counted_recompute))
        monkeypatch.setattr(M.AttentionRule, "factors", factors)


def _padding(n: int) -> Tensor:
    mask = torch.zeros(B, n, dtype=torch.bool)
    mask[0, 3:] = True
    mask[2, 1:] = True
    return mask


CALLS = {
    "plain": lambda: {},
    "causal": lambda: {
        "attn_mask": nn.Transformer.generate_square_subsequent_mask(T),
        "is_causal": True,
    },
    "padding": lambda: {"key_padding_mask": _padding(T)},
    "padding_float": lambda: {"key_padding_mask": _padding(T).double() * -1e9},
    "mask_3d": lambda: {"attn_mask": torch.randn(B * 2, T, T)},
    "cross": lambda: {"mem": torch.randn(B, T + 2, E), "key_padding_mask": _padding(T + 2)},
    "cross_kdim": lambda: {"mem": torch.randn(B, T + 2, 6)},
    "no_bias": lambda: {},
}


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", list(CALLS))
def test_graph_path_equals_recomputation(
    monkeypatch: pytest.MonkeyPatch, call: str, batch_first: bool, K: int
) -> None:
    kw = CALLS[call]()
    mem = kw.pop("mem", None)
    kdim = None if mem is None else mem.shape[-1]
    bias = call != "no_bias"
    attn = nn.MultiheadAttention(E, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
    head = nn.Linear(E, 3 * K)
    model = nn.ModuleList([attn, head])
    x = torch.randn(B, T, E)

    def losses() -> Tensor:
        q, kv = x, x if mem is None else mem
        if not batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out = attn(q, kv, kv, need_weights=False, **kw)[0]
        if not batch_first:
            out = out.transpose(0, 1)
        return head(out).pow(2).sum(1).view(B, K, 3).sum(2).squeeze(1)

    paths = Paths(monkeypatch, compare=True)
    engine = LayerwiseGramianEngine(model)
    no_fallback(engine)
    L = losses()
    params = list(model.parameters())
    result = engine.compute(L, params, retain_graph=True)
    assert (paths.compared, paths.graph, paths.recomputed) == (1, 1, 0)
    assert_matches_jacobian(result, L, params)
    engine.remove()


class W4Like(nn.Module):
    """W4's model, smaller: embedding, 2 Transformer encoder layers, mean, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, t: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(t)).mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_w4_layers_take_the_graph_path(monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """Both layers' attention takes the graph path (float32 as in training, and float64), and
    the Gramian equals the recomputation's (float32) and the Jacobian's (float64)."""
    torch.set_default_dtype(dtype)
    model = W4Like()
    params = list(model.parameters())
    t, y = torch.randint(0, 20, (6, 7)), torch.randint(0, 5, (6,))

    def gramian(engine: LayerwiseGramianEngine, retain: bool = False):
        losses = F.cross_entropy(model(t), y, reduction="none")
        return losses, engine.compute(losses, params, retain_graph=retain)

    engine = LayerwiseGramianEngine(model)
    no_fallback(engine)
    paths = Paths(monkeypatch)
    losses, result = gramian(engine, retain=dtype == torch.float64)
    assert (paths.graph, paths.recomputed) == (2, 0)
    if dtype == torch.float64:
        assert_matches_jacobian(result, losses, params)
    else:  # the graph is freed as without this path
        with pytest.raises(RuntimeError, match="second time"):
            losses.sum().backward()
        monkeypatch.setattr(M, "_graph_edges", lambda *args: None)
        _, ref = gramian(engine)
        assert (paths.graph, paths.recomputed) == (2, 2)
        torch.testing.assert_close(result.gramian, ref.gramian, rtol=1e-4, atol=1e-6)
    assert engine._records == []
    engine.remove()


FALLBACKS = ["math_backend", "saved_hooks", "zero_attn", "frozen_out_proj", "need_weights"]


@pytest.mark.parametrize("case", FALLBACKS)
def test_other_graphs_recompute(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Where the graph is not the expected one, the rule recomputes (exactly)."""
    attn = nn.MultiheadAttention(E, 2, batch_first=True, add_zero_attn=case == "zero_attn")
    if case == "frozen_out_proj":
        attn.out_proj.weight.requires_grad_(False)
    head = nn.Linear(E, 3)
    model = nn.ModuleList([attn, head])
    x = torch.randn(B, T, E)
    paths = Paths(monkeypatch)
    engine = LayerwiseGramianEngine(model)
    no_fallback(engine)
    if case == "math_backend":
        with sdpa_kernel(SDPBackend.MATH):
            out = attn(x, x, x, need_weights=False)[0]
    elif case == "saved_hooks":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = attn(x, x, x, need_weights=False)[0]
    else:
        out = attn(x, x, x, need_weights=case == "need_weights")[0]
    losses = head(out).pow(2).sum((1, 2))
    params = [p for p in model.parameters() if p.requires_grad]
    result = engine.compute(losses, params, retain_graph=True)
    assert (paths.graph, paths.recomputed) == (0, 1)
    assert_matches_jacobian(result, losses, params)
    engine.remove()
