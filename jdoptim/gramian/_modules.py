r"""Module rules: exact per-sample gradient factors of whole modules (attention, recurrent layers).

The rules of :mod:`jdoptim.gramian._layers` read one input and one output of a module. A
*module rule* handles a module with several inputs and outputs whose parameters it uses
directly, and whose computation is **per-sample separable along its batch dimension** (output
``b`` depends on input ``b`` only). Its forward hook keeps the call's inputs; once the ordinary
backward has given the gradients :math:`\delta` of the losses with respect to every output of
the call, the rule **recomputes the module once, batched** (no ``vmap``), with its internal
linear maps exposed, and one backward of that recomputation with :math:`\delta` gives the
gradients of the losses with respect to the inputs and outputs of those linear maps. Because the
module is per-sample separable, these are per-sample quantities (row ``b`` only involves sample
``b``), so every parameter is a linear map applied position-wise and becomes a ghost / materialised
:class:`~jdoptim.gramian._layers.LinearFactor`:

* ``nn.MultiheadAttention``: :math:`Q = X_q W_q^\top + b_q` (same for ``K``, ``V``), attention,
  then :math:`Y = O W_o^\top + b_o`. For calls with ``need_weights=False`` (those of
  ``nn.TransformerEncoderLayer`` / ``DecoderLayer``) the recomputation merges the masks and calls
  ``scaled_dot_product_attention`` on the projected :math:`Q, K, V` exactly as
  :func:`torch.nn.functional.multi_head_attention_forward` does; otherwise (attention weights,
  ``add_zero_attn``) it calls that function on them with identity projections (exact: a product
  with an identity matrix rounds nothing). Either way masks (padding, causal, float, 3-D
  per-head), ``need_weights`` and ``add_zero_attn`` behave exactly as in the module.
  ``in_proj_weight`` is one linear map on :math:`X` for self-attention (``query is key is
  value``) or three groups otherwise; ``out_proj`` is a linear map on :math:`O` with
  :math:`\partial L / \partial O = \delta W_o`.
* ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (any layers, bidirectional, ``proj_size``): unrolled in
  time, :math:`W_{ih}` is a linear map on the layer's input sequence and :math:`W_{hh}` one on the
  previous hidden states (:math:`W_{hr}` on :math:`o_t \odot \tanh c_t`), each over ``T``
  positions.

This replaces a per-sample ``vmap`` of the module's vector-Jacobian product, which we measured at
7x the module's own forward + backward for attention (``vmap`` has no batching rule for the CPU
flash-attention kernel and loops over samples) and which does not run for ``nn.GRU`` under
``torch.func.functional_call``.

**When a rule applies.** Only for these known module types, whose separability is known from
their definition, and only for calls the rule can recompute exactly: batched inputs, no active
dropout (a recomputation would draw other masks), no ``PackedSequence`` (a packed batch is
flattened across samples), no ``bias_k``/``bias_v``, the module's own ``forward``, parameters
unchanged. Any other call, and any other module, is left to the engine's exact fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._layers import Dims, Factor, LinearFactor, PerSample, Want

_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
_MHA_DEFAULTS = {
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "average_attn_weights": True,
    "is_causal": False,
}


@dataclass
class Saved:
    """What a module rule keeps of one call."""

    outputs: list[Tensor]
    """The call's outputs that the losses may reach (still in the graph)."""
    out_dims: list[int]
    """The batch dimension of each of ``outputs``."""
    inputs: list[Tensor]
    """The call's tensor inputs (their ``grad_fn`` bounds the call in the graph)."""
    batch: int
    """The call's batch size."""
    data: dict = field(default_factory=dict)
    """Rule-specific detached inputs and flags."""


def _same_class(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` computes what ``cls`` computes (no overridden ``forward``)."""
    if not isinstance(module, cls) or "forward" in module.__dict__:
        return False
    return type(module).forward is cls.forward


class ModuleRule:
    """A rule for one module type (see the module docstring)."""

    name = "module"

    def claims(self, module: nn.Module) -> list[str] | None:
        """Names (relative to ``module``) of the parameters the rule differentiates, or
        ``None`` when it cannot claim this module."""
        raise NotImplementedError

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> Saved | None:
        """What the forward hook keeps, or ``None`` when this call cannot be recomputed
        exactly (the engine then falls back)."""
        raise NotImplementedError

    def factors(
        self,
        module: nn.Module,
        pidx: dict[str, int],
        saved: Saved,
        deltas: list[Tensor | None],
        dims: Dims,
        want: Want,
    ) -> list[Factor]:
        """Factors of the wanted parameters; ``deltas[j]`` is ``[B, K, *dims of output j but
        its batch dimension]`` (``None``: the losses do not reach that output)."""
        raise NotImplementedError


def _linear(w: int | None, b: int | None, A: Tensor, D: Tensor, dtype: torch.dtype) -> list[Factor]:
    """Factors of a linear map with inputs ``A`` ``[G, B, T, d]`` and output gradients ``D``
    ``[G, B, K, T, p]`` (weight ``w``, bias ``b``, either ``None`` when not wanted)."""
    D = D.to(dtype)
    if w is None:
        if b is None:
            return []
        G, B, K, _, p = D.shape
        return [PerSample({b: D.sum(3).permute(1, 2, 0, 3).reshape(B, K, G * p)})]
    return [LinearFactor(w, b, A.to(dtype), D)]


def _wanted(pidx: dict[str, int], name: str, want: Want) -> int | None:
    i = pidx.get(name)
    return i if i is not None and want(i) else None


def _to_k_first(D: Tensor) -> Tensor:
    """``[B, K, ...]`` -> ``[K, B, ...]``."""
    return D.transpose(0, 1)


def _grads(
    outputs: list[Tensor], inputs: list[Tensor], deltas: list[Tensor], K: int
) -> tuple[Tensor | None, ...]:
    """Gradients of ``inputs`` for the cotangents ``deltas`` (each ``[K, *output.shape]``),
    as ``[K, *input.shape]``: one backward (batched over ``K`` when ``K > 1``)."""
    if K == 1:
        grads = torch.autograd.grad(outputs, inputs, [d[0] for d in deltas], allow_unused=True)
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    return torch.autograd.grad(outputs, inputs, deltas, allow_unused=True, is_grads_batched=True)


# ------------------------------------------------------------------------------- attention


class AttentionRule(ModuleRule):
    """``nn.MultiheadAttention`` (see the module docstring)."""

    name = "attention"

    def claims(self, module):
        if not _same_class(module, nn.MultiheadAttention) or parametrize.is_parametrized(module):
            return None
        if module.bias_k is not None or module.bias_v is not None:
            return None
        out = module.out_proj
        if parametrize.is_parametrized(out) or set(out._parameters) - {"weight", "bias"}:
            return None
        names = [n for n, p in module._parameters.items() if p is not None]
        return names + [f"out_proj.{n}" for n, p in out._parameters.items() if p is not None]

    def save(self, module, args, kwargs, output):
        if module.training and module.dropout > 0:
            return None
        values = dict(_MHA_DEFAULTS)
        values.update(zip(_MHA_ARGS, args, strict=False))
        values.update(kwargs)
        query, key, value = values["query"], values["key"], values["value"]
        if not all(isinstance(t, Tensor) and t.dim() == 3 for t in (query, key, value)):
            return None
        if any(t.is_nested for t in (query, key, value)):
            return None
        if not isinstance(output, tuple) or not isinstance(output[0], Tensor):
            return None
        bd = 0 if module.batch_first else 1
        outputs, out_dims = [output[0]], [bd]
        if isinstance(output[1], Tensor) and output[1].requires_grad:
            outputs.append(output[1])
            out_dims.append(0)
        masks = [values["key_padding_mask"], values["attn_mask"]]
        inputs = [t for t in (query, key, value, *masks) if isinstance(t, Tensor)]
        data = {
            "query": query.detach(),
            "key": key.detach(),
            "value": value.detach(),
            "self": query is key and key is value,
            "key_padding_mask": None if masks[0] is None else masks[0].detach(),
            "attn_mask": None if masks[1] is None else masks[1].detach(),
            "need_weights": values["need_weights"],
            "average_attn_weights": values["average_attn_weights"],
            "is_causal": values["is_causal"],
            "bd": bd,
        }
        return Saved(outputs, out_dims, inputs, query.shape[bd], data)

    def factors(self, module, pidx, saved, deltas, dims, want):
        d = saved.data
        B, K, E = dims.B, dims.K, module.embed_dim
        dtype = next(x for x in deltas if x is not None).dtype
        wdt = module.out_proj.weight.dtype
        # Inputs in the (L, N, E) layout of F.multi_head_attention_forward.
        q, k, v = (
            d[n] if d["bd"] == 1 else d[n].transpose(0, 1) for n in ("query", "key", "value")
        )
        if module._qkv_same_embed_dim:
            Wq, Wk, Wv = module.in_proj_weight.detach().chunk(3)
        else:
            Wq, Wk, Wv = (
                module.q_proj_weight.detach(),
                module.k_proj_weight.detach(),
                module.v_proj_weight.detach(),
            )
        bias = module.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.detach().chunk(3)
        Wo = module.out_proj.weight.detach()
        with torch.enable_grad():
            qp = F.linear(q, Wq, bq).requires_grad_()
            kp = F.linear(k, Wk, bk).requires_grad_()
            vp = F.linear(v, Wv, bv).requires_grad_()
            kpm = F._canonical_mask(
                mask=d["key_padding_mask"],
                mask_name="key_padding_mask",
                other_type=F._none_or_dtype(d["attn_mask"]),
                other_name="attn_mask",
                target_type=q.dtype,
            )
            am = F._canonical_mask(
                mask=d["attn_mask"],
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=q.dtype,
                check_other=False,
            )
            if not d["need_weights"] and not module.add_zero_attn:
                o, weights = _attention(qp, kp, vp, module.num_heads, kpm, am, d["is_causal"])
            else:
                o, weights = _attention_with_weights(module, qp, kp, vp, kpm, am, d, wdt)
            D0 = deltas[0]
            if D0 is None:
                D0 = torch.zeros(B, K, *o.shape[:1], E, dtype=dtype, device=o.device)
            # dL/dO = delta W_o, in the (L, N, E) layout, K first: [K, L, B, E].
            DO = (D0.to(wdt) @ Wo).permute(1, 2, 0, 3)
            outs, cots = [o], [DO]
            if len(deltas) > 1 and deltas[1] is not None and weights is not None:
                outs.append(weights)
                cots.append(_to_k_first(deltas[1]).to(weights.dtype))
            dq, dk, dv = _grads(outs, [qp, kp, vp], cots, K)

        def bk_t(g: Tensor | None, like: Tensor) -> Tensor:  # [K, T, B, E] -> [B, K, T, E]
            if g is None:
                return torch.zeros(B, K, like.shape[0], E, dtype=dtype, device=like.device)
            return g.permute(2, 0, 1, 3)

        dq, dk, dv = bk_t(dq, q), bk_t(dk, k), bk_t(dv, v)
        factors: list[Factor] = []
        # out_proj: a linear map on O (the attention output before it).
        A_o = o.detach().transpose(0, 1).unsqueeze(0)  # [1, B, L, E]
        wo, bo = _wanted(pidx, "out_proj.weight", want), _wanted(pidx, "out_proj.bias", want)
        factors += _linear(wo, bo, A_o, D0.unsqueeze(0), dtype)
        xq, xk, xv = (t.transpose(0, 1) for t in (q, k, v))  # [B, T, d]
        b = _wanted(pidx, "in_proj_bias", want)
        if module._qkv_same_embed_dim:
            w = _wanted(pidx, "in_proj_weight", want)
            if d["self"]:
                D = torch.cat([dq, dk, dv], dim=-1).unsqueeze(0)
                factors += _linear(w, b, xq.unsqueeze(0), D, dtype)
            else:
                T = max(xq.shape[1], xk.shape[1])
                A = torch.stack([_pad(x, T, 1) for x in (xq, xk, xv)])
                D = torch.stack([_pad(g, T, 2) for g in (dq, dk, dv)])
                factors += _linear(w, b, A, D, dtype)
        else:
            for name, x, g in (("q", xq, dq), ("k", xk, dk), ("v", xv, dv)):
                w = _wanted(pidx, f"{name}_proj_weight", want)
                factors += _linear(w, None, x.unsqueeze(0), g.unsqueeze(0), dtype)
            if b is not None:
                factors.append(PerSample({b: torch.cat([g.sum(2) for g in (dq, dk, dv)], -1)}))
        return factors


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
) -> tuple[Tensor, None]:
    """The attention of :func:`torch.nn.functional.multi_head_attention_forward` between the
    projections and ``out_proj`` (``need_weights=False``, no ``add_zero_attn``, no dropout),
    on projected ``q`` ``[L, N, E]`` and ``k``, ``v`` ``[S, N, E]`` with the canonical (float)
    masks: the masks are merged and ``scaled_dot_product_attention`` called exactly as there,
    without its four products with identity projections. Returns ``O`` ``[L, N, E]``."""
    L, N, E = q.shape
    S = k.shape[0]
    if is_causal and key_padding_mask is None:
        attn_mask = None  # the module passes the hint to SDPA
    elif key_padding_mask is not None:
        is_causal = False  # merged below: no longer causal
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(N, 1, 1, S).expand(-1, num_heads, -1, -1)
        kpm = kpm.reshape(N * num_heads, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(N, num_heads, -1, S)

    def heads(x: Tensor) -> Tensor:  # [T, N, E] -> [N, H, T, E / H]
        return x.reshape(x.shape[0], N, num_heads, E // num_heads).permute(1, 2, 0, 3)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask, 0.0, is_causal)
    return o.permute(2, 0, 1, 3).reshape(L, N, E), None


def _attention_with_weights(
    module: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    d: dict,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None]:
    """The general case: :func:`torch.nn.functional.multi_head_attention_forward` on the
    projected ``q``, ``k``, ``v`` with identity projections (exact), for the weights and
    ``add_zero_attn``."""
    E = module.embed_dim
    eye = torch.eye(E, dtype=dtype, device=q.device)
    return F.multi_head_attention_forward(
        q,
        k,
        v,
        E,
        module.num_heads,
        None,
        None,
        None,
        None,
        module.add_zero_attn,
        0.0,
        eye,
        None,
        training=False,
        key_padding_mask=key_padding_mask,
        need_weights=d["need_weights"],
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=d["average_attn_weights"],
        is_causal=d["is_causal"],
    )


def _pad(x: Tensor, T: int, dim: int) -> Tensor:
    """Zero positions up to ``T`` along ``dim`` (they add nothing to a linear factor)."""
    n = x.shape[dim]
    if n == T:
        return x
    shape = list(x.shape)
    shape[dim] = T - n
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


# ------------------------------------------------------------------------------- recurrent


class RecurrentRule(ModuleRule):
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` unrolled in time (see the module docstring)."""

    name = "recurrent"

    def claims(self, module):
        if parametrize.is_parametrized(module):
            return None
        if not any(_same_class(module, c) for c in (nn.RNN, nn.GRU, nn.LSTM)):
            return None
        if list(module._parameters) != list(module._flat_weights_names):
            return None
        return list(module._parameters)

    def save(self, module, args, kwargs, output):
        if module.training and module.dropout > 0 and module.num_layers > 1:
            return None
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if not isinstance(x, Tensor) or x.dim() != 3:  # PackedSequence, unbatched
            return None
        out, h = output
        bd = 0 if module.batch_first else 1
        outputs, out_dims = [out], [bd]
        hs = list(h) if isinstance(h, tuple) else [h]
        outputs += hs
        out_dims += [1] * len(hs)
        if hx is None:
            hx_t: list[Tensor] = []
        else:
            hx_t = list(hx) if isinstance(hx, tuple) else [hx]
        data = {"x": x.detach(), "hx": [t.detach() for t in hx_t], "bd": bd}
        return Saved(outputs, out_dims, [x, *hx_t], x.shape[bd], data)

    def factors(self, module, pidx, saved, deltas, dims, want):
        d = saved.data
        B, K = dims.B, dims.K
        dtype = next(x for x in deltas if x is not None).dtype
        lstm = isinstance(module, nn.LSTM)
        L, nd = module.num_layers, 2 if module.bidirectional else 1
        H = module.hidden_size
        Hout = module.proj_size if lstm and module.proj_size > 0 else H
        x = d["x"] if d["bd"] == 0 else d["x"].transpose(0, 1)  # [B, T, I]
        T = x.shape[1]
        wdt = module._flat_weights[0].dtype
        if d["hx"]:
            h0 = d["hx"][0]
            c0 = d["hx"][1] if lstm else None
        else:
            h0 = x.new_zeros(L * nd, B, Hout, dtype=wdt)
            c0 = x.new_zeros(L * nd, B, H, dtype=wdt) if lstm else None
        P = {n: getattr(module, n).detach() for n in module._flat_weights_names}
        record: list[tuple[str, Tensor, Tensor | list[Tensor]]] = []  # (param name, A, outputs)
        with torch.enable_grad():
            # Fresh leaves (copies, not views: a detached view of the input made a leaf breaks
            # AOTAutograd's view replay under torch.compile), so every intermediate has a grad.
            inp = x.to(wdt).clone(memory_format=torch.contiguous_format).requires_grad_()
            h0 = h0.to(wdt).clone().requires_grad_()
            c0 = None if c0 is None else c0.to(wdt).clone().requires_grad_()
            h_n, c_n = [], []
            for layer in range(L):
                outs = []
                for direction in range(nd):
                    sfx = f"_l{layer}" + ("_reverse" if direction else "")
                    idx = layer * nd + direction
                    gi = F.linear(inp, P["weight_ih" + sfx], P.get("bias_ih" + sfx))
                    record.append(("ih" + sfx, inp, gi))
                    h = h0[idx]
                    c = None if c0 is None else c0[idx]
                    hs, ghs, prev, ms, projs = [], [], [], [], []
                    steps = range(T - 1, -1, -1) if direction else range(T)
                    # One unbind, not T selects (each select's backward fills a zero tensor of
                    # gi's whole size and adds it up: T^2 traffic).
                    gis = gi.unbind(1)
                    for t in steps:
                        gh = F.linear(h, P["weight_hh" + sfx], P.get("bias_hh" + sfx))
                        prev.append(h)
                        ghs.append(gh)
                        h, c, m = _cell(module, gis[t], gh, h, c, P.get("weight_hr" + sfx))
                        if m is not None:
                            ms.append(m)
                            projs.append(h)
                        hs.append(h)
                    if direction:
                        hs, ghs, prev, ms, projs = (s[::-1] for s in (hs, ghs, prev, ms, projs))
                    record.append(("hh" + sfx, torch.stack(prev, 1), ghs))
                    if ms:
                        record.append(("hr" + sfx, torch.stack(ms, 1), projs))
                    outs.append(torch.stack(hs, 1))
                    h_n.append(h)
                    if c is not None:
                        c_n.append(c)
                inp = torch.cat(outs, -1) if nd > 1 else outs[0]
            outputs = [inp, torch.stack(h_n, 1)] + ([torch.stack(c_n, 1)] if lstm else [])
            shapes = [o.shape for o in outputs]  # [B, ...] each (batch first)
            cots = []
            for D, s in zip(deltas, shapes, strict=False):
                D = torch.zeros(B, K, *s[1:], dtype=wdt, device=x.device) if D is None else D
                cots.append(_to_k_first(D.reshape(B, K, *s[1:])).to(wdt))
            targets: list[Tensor] = []
            for _, _, z in record:
                targets += z if isinstance(z, list) else [z]
            grads = list(_grads(outputs, targets, cots, K))
        factors: list[Factor] = []
        pos = 0
        for name, A, z in record:
            n = len(z) if isinstance(z, list) else 1
            gs = grads[pos : pos + n]
            pos += n
            gs = [
                torch.zeros_like(t).expand(K, *t.shape) if g is None else g
                for g, t in zip(gs, z if isinstance(z, list) else [z], strict=True)
            ]
            G = torch.stack(gs, 2) if isinstance(z, list) else gs[0]  # [K, B, T, p]
            kind, sfx = name[:2], name[2:]
            w = _wanted(pidx, f"weight_{kind}{sfx}", want)
            b = _wanted(pidx, f"bias_{kind}{sfx}", want) if kind != "hr" else None
            D = G.transpose(0, 1).unsqueeze(0)  # [1, B, K, T, p]
            factors += _linear(w, b, A.detach().unsqueeze(0), D, dtype)
        return factors


def _cell(
    module: nn.Module, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None, w_hr: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One step: the new ``h`` (projected for an LSTM with ``proj_size``), ``c``, and the
    LSTM's unprojected ``o * tanh(c)`` when there is a projection (else ``None``)."""
    if isinstance(module, nn.GRU):
        # r and z in one sigmoid, h' = (1 - z) n + z h as n + z (h - n): 10 autograd nodes a
        # step instead of 13 (the unrolled backward is dispatch-bound).
        H = h.shape[-1]
        i_rz, i_n = gi.split([2 * H, H], -1)
        h_rz, h_n = gh.split([2 * H, H], -1)
        r, z = torch.sigmoid(i_rz + h_rz).chunk(2, -1)
        n = torch.tanh(torch.addcmul(i_n, r, h_n))
        return torch.addcmul(n, z, h - n), None, None
    if isinstance(module, nn.LSTM):
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        m = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            return F.linear(m, w_hr), c, m
        return m, c, None
    act = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return act(gi + gh), None, None


ATTENTION, RECURRENT = AttentionRule(), RecurrentRule()


def module_rule_for(module: nn.Module) -> tuple[ModuleRule, list[str]] | None:
    """The module rule of ``module`` and the parameters it claims, or ``None``."""
    for rule in (ATTENTION, RECURRENT):
        names = rule.claims(module)
        if names is not None:
            return rule, names
    return None
