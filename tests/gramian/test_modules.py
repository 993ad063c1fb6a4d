"""Module rules (attention, recurrent layers): exact per-sample Gramians without the fallback.

Every case equals the brute-force Jacobian Gramian (float64, 1e-10 relative). Where the rule must
apply, the engine's whole-model fallback is made to raise, so the test fails if the rule does not
claim the module; where it must not (packed sequences, active dropout, ``bias_k``, a weight used
outside the module), the result is still exact through the fallback.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from jdoptim.gramian import LayerwiseGramianEngine

from ._exact import assert_matches_jacobian, no_fallback

pytestmark = pytest.mark.usefixtures("float64_default")


def check(model: nn.Module, losses_fn, *, claimed: bool, batch_dim: int = 0) -> None:
    engine = LayerwiseGramianEngine(model, batch_dim=batch_dim)
    if claimed:
        no_fallback(engine)
    losses = losses_fn()
    params = [p for p in model.parameters() if p.requires_grad]
    result = engine.compute(losses, params, retain_graph=True)
    assert_matches_jacobian(result, losses, params)
    engine.remove()


# ------------------------------------------------------------------------------- attention

B, T, E = 4, 5, 8


def _causal(n: int) -> Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n)


def _padding() -> Tensor:
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:] = True
    mask[2, 1:] = True
    return mask


MHA_CALLS = {
    "plain": {},
    "no_weights": {"need_weights": False},
    "per_head_weights": {"average_attn_weights": False},
    "padding": {"key_padding_mask": _padding},
    "padding_float": {"key_padding_mask": lambda: _padding().double() * -1e9},
    "causal": {"attn_mask": lambda: _causal(T), "is_causal": True, "need_weights": False},
    "causal_weights": {"attn_mask": lambda: _causal(T)},
    "causal_padding": {"attn_mask": lambda: _causal(T), "key_padding_mask": _padding},
    "mask_3d": {"attn_mask": lambda: torch.randn(B * 2, T, T)},
    # need_weights=False: the recomputation merges the masks itself (no identity projections)
    "padding_no_weights": {"key_padding_mask": _padding, "need_weights": False},
    "padding_float_no_weights": {
        "key_padding_mask": lambda: _padding().double() * -1e9,
        "need_weights": False,
    },
    "causal_padding_no_weights": {
        "attn_mask": lambda: _causal(T),
        "key_padding_mask": _padding,
        "is_causal": True,
        "need_weights": False,
    },
    "mask_2d_no_weights": {"attn_mask": lambda: torch.randn(T, T), "need_weights": False},
    "mask_3d_no_weights": {"attn_mask": lambda: torch.randn(B * 2, T, T), "need_weights": False},
}


class Attend(nn.Module):
    def __init__(self, batch_first: bool, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first, **kw)
        self.head = nn.Linear(E, 3)
        self.batch_first = batch_first

    def forward(self, x: Tensor, mem: Tensor | None = None, **kw) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
            mem = None if mem is None else mem.transpose(0, 1)
        kv = x if mem is None else mem
        out, w = self.attn(x, kv, kv, **kw)
        if not self.batch_first:
            out = out.transpose(0, 1)
        losses = self.head(out).pow(2).sum((1, 2))
        if w is not None:  # the attention weights reach the losses too
            losses = losses + w.pow(2).flatten(1).sum(1)
        return losses


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", list(MHA_CALLS))
def test_attention_self(batch_first: bool, call: str) -> None:
    model = Attend(batch_first)
    kw = {k: v() if callable(v) else v for k, v in MHA_CALLS[call].items()}
    x = torch.randn(B, T, E)
    check(model, lambda: model(x, **kw), claimed=True)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_attention_cross(batch_first: bool, kdim: int | None) -> None:
    """Queries and keys of different lengths (and sizes: separate projection weights)."""
    model = Attend(batch_first, kdim=kdim, vdim=kdim)
    x, mem = torch.randn(B, T, E), torch.randn(B, T + 2, kdim or E)
    mask = torch.zeros(B, T + 2, dtype=torch.bool)
    mask[1, 4:] = True
    check(model, lambda: model(x, mem, key_padding_mask=mask), claimed=True)


def test_attention_batch_dim_1() -> None:
    """A sequence-first model with the engine's batch_dim=1."""
    attn, head = nn.MultiheadAttention(E, 2), nn.Linear(E, 2)
    model = nn.ModuleList([attn, head])
    x = torch.randn(T, B, E)
    losses = lambda: head(attn(x, x, x)[0]).pow(2).sum(2).sum(0, keepdim=True)  # noqa: E731
    check(model, losses, claimed=True, batch_dim=1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layers(batch_first: bool) -> None:
    enc = nn.TransformerEncoderLayer(E, 2, 12, dropout=0.0, batch_first=batch_first)
    dec = nn.TransformerDecoderLayer(E, 2, 12, dropout=0.0, batch_first=batch_first)
    head = nn.Linear(E, 2)
    model = nn.ModuleList([enc, dec, head])
    src, tgt = torch.randn(B, T + 1, E), torch.randn(B, T, E)
    pad = torch.zeros(B, T + 1, dtype=torch.bool)
    pad[0, 2:] = True

    def losses() -> Tensor:
        s, t = (src, tgt) if batch_first else (src.transpose(0, 1), tgt.transpose(0, 1))
        mem = enc(s, src_key_padding_mask=pad)
        out = dec(t, mem, tgt_mask=_causal(T), tgt_is_causal=True, memory_key_padding_mask=pad)
        if batch_first:
            return head(out).pow(2).sum((1, 2))
        return head(out).pow(2).sum((0, 2))[None]  # [1, B]: the batch along dimension 1

    # A sequence-first model: every layer sees the batch along dimension 1.
    check(model, losses, claimed=True, batch_dim=0 if batch_first else 1)


def test_attention_multi_losses() -> None:
    """K = 3 losses per sample ([B, K] losses)."""
    model = Attend(True)
    x = torch.randn(B, T, E)

    def losses() -> Tensor:
        out = model.attn(x, x, x, need_weights=False)[0]
        return model.head(out).pow(2).sum(1)

    check(model, losses, claimed=True)


@pytest.mark.parametrize("case", ["dropout", "bias_kv", "weight_outside", "unbatched"])
def test_attention_not_claimed_is_exact(case: str) -> None:
    kw = (
        {"dropout": 0.3}
        if case == "dropout"
        else {"add_bias_kv": True}
        if case == "bias_kv"
        else {}
    )
    model = Attend(True, **kw)
    x = torch.randn(B, T, E)
    torch.manual_seed(1)

    def losses() -> Tensor:
        if case == "unbatched":
            return torch.stack([model.attn(x[b], x[b], x[b])[0].pow(2).sum() for b in range(B)])
        out = model(x)
        if case == "weight_outside":
            out = out + (x @ model.attn.out_proj.weight.T).pow(2).sum((1, 2))
        return out

    check(model, losses, claimed=False)


# ------------------------------------------------------------------------------- recurrent

RNNS = {
    "rnn": (nn.RNN, {}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "gru": (nn.GRU, {}),
    "lstm": (nn.LSTM, {}),
    "lstm_proj": (nn.LSTM, {"proj_size": 3}),
    "gru_deep_bi": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    "lstm_deep_bi_proj": (nn.LSTM, {"num_layers": 2, "bidirectional": True, "proj_size": 2}),
    "no_bias": (nn.GRU, {"bias": False}),
}


def _rnn(name: str, batch_first: bool) -> tuple[nn.RNNBase, nn.Linear]:
    cls, kw = RNNS[name]
    rnn = cls(4, 5, batch_first=batch_first, **kw)
    out = (kw.get("proj_size") or 5) * (2 if rnn.bidirectional else 1)
    return rnn, nn.Linear(out, 2)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("name", list(RNNS))
@pytest.mark.parametrize("initial", [False, True])
def test_recurrent(name: str, batch_first: bool, initial: bool) -> None:
    rnn, head = _rnn(name, batch_first)
    model = nn.ModuleList([rnn, head])
    x = torch.randn(3, 6, 4)
    nd = rnn.num_layers * (2 if rnn.bidirectional else 1)
    hsize = getattr(rnn, "proj_size", 0) or 5
    h0 = torch.randn(nd, 3, hsize)
    hx = (h0, torch.randn(nd, 3, 5)) if isinstance(rnn, nn.LSTM) else h0

    def losses() -> Tensor:
        inp = x if batch_first else x.transpose(0, 1)
        out, h = rnn(inp, hx) if initial else rnn(inp)
        out = out if batch_first else out.transpose(0, 1)
        hn = h[0] if isinstance(h, tuple) else h
        return head(out).pow(2).sum((1, 2)) + hn.pow(3).sum((0, 2))

    check(model, losses, claimed=True)


@pytest.mark.parametrize("name", ["lstm_deep_bi_proj", "gru_deep_bi", "rnn_relu"])
def test_recurrent_every_output_and_several_losses_per_sample(name: str) -> None:
    """Two losses per sample (the backward batched over K) reaching the output sequence, h_n
    and an LSTM's c_n, each only through some layers and directions."""
    rnn, head = _rnn(name, True)
    model = nn.ModuleList([rnn, head])
    x = torch.randn(3, 6, 4)

    def losses() -> Tensor:
        out, h = rnn(x)
        hn, cn = h if isinstance(h, tuple) else (h, None)
        first = head(out[:, 2:]).pow(2).sum((1, 2)) + hn[0].pow(3).sum(1)
        second = hn[-1].sin().sum(1) + (0 if cn is None else cn[1:].pow(2).sum((0, 2)))
        return torch.stack([first, second], 1)  # [B, 2]

    check(model, losses, claimed=True)


def test_recurrent_packed_is_exact() -> None:
    """A packed batch mixes samples along its data: the fallback, exact."""
    rnn, head = _rnn("lstm", True)
    model = nn.ModuleList([rnn, head])
    x = torch.randn(3, 6, 4)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True)
    check(model, lambda: head(rnn(packed)[1][0][-1]).pow(2).sum(1), claimed=False)


def test_recurrent_dropout_is_exact() -> None:
    rnn = nn.GRU(4, 5, num_layers=2, dropout=0.5, batch_first=True)
    x = torch.randn(3, 6, 4)
    check(rnn, lambda: rnn(x)[0].pow(2).sum((1, 2)), claimed=False)


def test_report_names_the_rules() -> None:
    model = nn.ModuleList([nn.MultiheadAttention(E, 2), nn.GRU(3, 4)])
    report = LayerwiseGramianEngine(model).report()
    assert report["0"] == "attention" and report["1"] == "recurrent"


def test_batchnorm_training_still_raises() -> None:
    model = nn.Sequential(nn.Linear(E, E), nn.BatchNorm1d(E))
    attn = nn.MultiheadAttention(E, 2, batch_first=True)
    engine = LayerwiseGramianEngine(model, attn)
    x = torch.randn(B, T, E)
    h = model(attn(x, x, x)[0].mean(1))
    with pytest.raises(ValueError, match="mix the samples"):
        engine.compute(h.pow(2).sum(1), list(model.parameters()) + list(attn.parameters()))


def test_input_modified_in_place_raises() -> None:
    attn = nn.MultiheadAttention(E, 2, batch_first=True)
    engine = LayerwiseGramianEngine(attn)
    x = torch.randn(B, T, E).requires_grad_()
    h = x * 1
    out = attn(h, h, h)[0].pow(2).sum((1, 2))
    h.mul_(2)
    with pytest.raises(ValueError, match="modified in place"):
        engine.compute(out, list(attn.parameters()))


class SeqNet(nn.Module):
    """Tiny embedding -> attention -> GRU -> head (the compile test's model)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.gru = nn.GRU(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, t: Tensor) -> Tensor:
        h = self.emb(t)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.gru(h)[0][:, -1])


def test_compile_fullgraph_matches_eager() -> None:
    """Attention and recurrent rules inside one compiled graph (float32, like training)."""
    torch.set_default_dtype(torch.float32)
    model = SeqNet()
    params = list(model.parameters())
    engine = LayerwiseGramianEngine(model)

    def step(t: Tensor, y: Tensor) -> Tensor:
        losses = ((model(t) - y) ** 2).sum(1)
        result = engine.compute(losses, params)
        result.backward(torch.softmax(result.gramian.diagonal(), 0))
        return result.gramian

    t, y = torch.randint(0, 7, (3, 5)), torch.randn(3, 2)
    with torch._dynamo.config.patch(trace_autograd_ops=True, allow_rnn=True):
        G_eager = step(t, y)
        g_eager = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        G = torch.compile(step, fullgraph=True)(t, y)
    torch.testing.assert_close(G, G_eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(params, g_eager, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert engine._records == []


@pytest.mark.parametrize("name", ["gru", "lstm_proj"])
def test_recurrent_multi_losses(name: str) -> None:
    """K = 2 losses per sample ([B, K] losses): the recomputation's backward is batched over K."""
    rnn, head = _rnn(name, True)
    model = nn.ModuleList([rnn, head])
    x = torch.randn(3, 6, 4)
    check(model, lambda: head(rnn(x)[0]).pow(2).sum(1), claimed=True)


@pytest.mark.parametrize("swap", ["parameter", "submodule"])
def test_parameters_swapped_after_hooking_take_the_fallback(swap: str) -> None:
    """A module rule checks at every call that its parameters are still the module's (here
    ``out_proj``'s weight, or ``out_proj`` itself, replaced after the engine was built): else
    the call takes the exact fallback. The old parameters, no longer used, are differentiated
    too: their gradients are zero, which a rule still claiming them would get wrong."""
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(E, 2, batch_first=True)
    engine = LayerwiseGramianEngine(mha)
    old = list(mha.out_proj.parameters())
    if swap == "parameter":
        mha.out_proj.weight = nn.Parameter(torch.randn(E, E))
    else:
        mha.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(E, E)
    x = torch.randn(B, T, E)
    losses = (mha(x, x, x, need_weights=False)[0] ** 2).sum((1, 2))
    params = list(mha.parameters()) + [p for p in old if all(p is not q for q in mha.parameters())]
    assert_matches_jacobian(engine.compute(losses, params, retain_graph=True), losses, params)
    assert engine._records == []
    engine.remove()
