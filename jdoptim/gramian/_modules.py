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

  **Without recomputation** (eager ``need_weights=False`` calls, :func:`_graph_edges`): the
  call's own autograd graph already holds what the recomputation produces. Behind ``out_proj``'s
  ``addmm`` node (which saved :math:`O`, its input) sits the attention kernel's node, whose first
  three edges lead to the :math:`Q, K, V` ``[N, H, T, E / H]`` views made for that kernel alone.
  The forward hook checks that chain node by node (types, ``out_proj``'s weight, the permutation,
  no dropout, saved shapes) and keeps :math:`O` and those three ``GradientEdge`` objects; the
  engine's one backward then also returns the gradients at the edges (batched over ``K`` like
  the outputs'), which are exactly :math:`\partial L / \partial Q, K, V`. Only the CPU flash
  kernel's node is accepted; any other graph (math backend, saved-tensor hooks that could
  recompute or move what is unpacked, ``add_zero_attn``, a frozen ``out_proj``,
  ``torch.compile``) is recomputed as above. On W4 this removes the recomputation (2.2 ms of a
  step for the two layers).
* ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (any layers, bidirectional, ``proj_size``): unrolled in
  time, :math:`W_{ih}` is a linear map on the layer's input sequence and :math:`W_{hh}` one on the
  previous hidden states (:math:`W_{hr}` on :math:`o_t \odot \tanh c_t`), each over ``T``
  positions. Here the recomputation runs without autograd and its backward is written out
  (:func:`_coefficients`): the cells' derivative factors are formed for all steps at once and the
  sequential loop is a few products a step (W5's GRU: 2.3 ms against 3.3 through autograd).

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
from torch.autograd.graph import GradientEdge
from torch.nn.utils import parametrize

from ._graph import saved_tensor_hooks_active
from ._layers import Dims, Factor, LinearFactor, PerSample, Want, as_dtype

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
    edges: list[GradientEdge] = field(default_factory=list)
    """Edges inside the call's graph whose gradients the rule also wants from the engine's
    backward (eager only, see :func:`_graph_edges`); their ``deltas`` follow the outputs'."""
    edge_dims: list[int] = field(default_factory=list)
    """The batch dimension of the gradient of each of ``edges``."""


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
        its batch dimension]`` (``None``: the losses do not reach that output), followed by the
        gradients of ``saved.edges`` in the same layout."""
        raise NotImplementedError


def _linear(w: int | None, b: int | None, A: Tensor, D: Tensor, dtype: torch.dtype) -> list[Factor]:
    """Factors of a linear map with inputs ``A`` ``[G, B, T, d]`` and output gradients ``D``
    ``[G, B, K, T, p]`` (weight ``w``, bias ``b``, either ``None`` when not wanted)."""
    D = as_dtype(D, dtype)
    if w is None:
        if b is None:
            return []
        G, B, K, _, p = D.shape
        return [PerSample({b: D.sum(3).permute(1, 2, 0, 3).reshape(B, K, G * p)})]
    return [LinearFactor(w, b, as_dtype(A, dtype), D)]


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
            "a_o": None,
        }
        saved = Saved(outputs, out_dims, inputs, query.shape[bd], data)
        if len(outputs) == 1 and not module.add_zero_attn:
            found = _graph_edges(module, output[0], bd, query, key)
            if found is not None:  # the gradients of q, k, v come from the engine's backward
                saved.edges, data["a_o"] = found
                saved.edge_dims = [0, 0, 0]
        return saved

    def factors(self, module, pidx, saved, deltas, dims, want):
        d = saved.data
        B, K, E = dims.B, dims.K, module.embed_dim
        dtype = next(x for x in deltas if x is not None).dtype
        D0 = deltas[0]
        if D0 is None:
            L = d["query"].shape[1 - d["bd"]]
            D0 = torch.zeros(B, K, L, E, dtype=dtype, device=d["query"].device)
        found = _from_graph(module, saved, deltas[len(saved.outputs) :], dims, dtype)
        if found is None:
            found = self._recompute(module, saved, deltas, D0, dims)
        A_o, dq, dk, dv = found
        return self._factors(module, pidx, saved, D0, A_o, dq, dk, dv, dims, want)

    @staticmethod
    def _recompute(
        module: nn.MultiheadAttention,
        saved: Saved,
        deltas: list[Tensor | None],
        D0: Tensor,
        dims: Dims,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``O`` ``[B, L, E]`` and the gradients of ``Q``, ``K``, ``V`` ``[B, K, T, E]`` from a
        recomputation of the attention and its backward."""
        d = saved.data
        B, K, E = dims.B, dims.K, module.embed_dim
        dtype = D0.dtype
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
            # dL/dO = delta W_o, in the (L, N, E) layout, K first: [K, L, B, E].
            DO = (D0.to(wdt) @ Wo).permute(1, 2, 0, 3)
            outs, cots = [o], [DO]
            if len(saved.outputs) > 1 and deltas[1] is not None and weights is not None:
                outs.append(weights)
                cots.append(_to_k_first(deltas[1]).to(weights.dtype))
            dq, dk, dv = _grads(outs, [qp, kp, vp], cots, K)

        def bk_t(g: Tensor | None, like: Tensor) -> Tensor:  # [K, T, B, E] -> [B, K, T, E]
            if g is None:
                return torch.zeros(B, K, like.shape[0], E, dtype=dtype, device=like.device)
            return g.permute(2, 0, 1, 3)

        return o.detach().transpose(0, 1), bk_t(dq, q), bk_t(dk, k), bk_t(dv, v)

    @staticmethod
    def _factors(
        module: nn.MultiheadAttention,
        pidx: dict[str, int],
        saved: Saved,
        D0: Tensor,
        A_o: Tensor,
        dq: Tensor,
        dk: Tensor,
        dv: Tensor,
        dims: Dims,
        want: Want,
    ) -> list[Factor]:
        """The factors of the projections from ``O`` ``[B, L, E]`` (``out_proj``'s input), the
        gradients ``D0`` of the output and those of ``Q``, ``K``, ``V`` (``[B, K, T, E]``)."""
        d = saved.data
        dtype = D0.dtype
        q, k, v = (
            d[n] if d["bd"] == 1 else d[n].transpose(0, 1) for n in ("query", "key", "value")
        )
        factors: list[Factor] = []
        # out_proj: a linear map on O (the attention output before it).
        A_o = A_o.unsqueeze(0)  # [1, B, L, E]
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


# The kernel whose backward node the graph of a call must hold for :func:`_graph_edges` (the
# CPU flash attention, which F.scaled_dot_product_attention picks on CPU for these calls; the
# math backend, other kernels and every other graph fall back to the recomputation).
_SDPA_NODE = "ScaledDotProductFlashAttentionForCpuBackward0"


def _name(node: object) -> str:
    return type(node).__name__


def _next(node: object, i: int, name: str) -> object | None:
    """The node of edge ``i`` of ``node`` (output 0 of it) when it is a ``name``, else ``None``."""
    edges = node.next_functions  # type: ignore[attr-defined]
    if i >= len(edges) or edges[i][1] != 0 or _name(edges[i][0]) != name:
        return None
    return edges[i][0]


def _graph_edges(
    module: nn.MultiheadAttention, out: Tensor, bd: int, query: Tensor, key: Tensor
) -> tuple[list[GradientEdge], Tensor] | None:
    """In the autograd graph of an eager ``need_weights=False`` call (output ``out``), the edges
    to the ``Q``, ``K``, ``V`` that ``scaled_dot_product_attention`` consumed and ``out_proj``'s
    input ``O`` ``[L, N, E]``; ``None`` unless the graph is exactly the one
    :func:`torch.nn.functional.multi_head_attention_forward` builds there.

    That function's graph, from the output back: (``batch_first``: a transpose), a view,
    ``out_proj`` (``addmm``, or ``mm`` without bias, whose weight must be the module's and
    whose saved first operand is ``O``), a view, (a clone), ``permute(2, 0, 1, 3)``, the
    attention kernel (no dropout), whose first three edges are the views ``[N, H, T, E / H]``
    of the projections that the function made for that call alone, so the gradient there is
    that of the attention's inputs only. Reads saved tensors (no copies); eager only."""
    if torch.compiler.is_compiling() or saved_tensor_hooks_active():
        return None
    node = out.grad_fn
    if node is None:
        return None
    if bd == 0:  # attn_output.transpose(1, 0)
        if _name(node) != "TransposeBackward0" or {node._saved_dim0, node._saved_dim1} != {0, 1}:
            return None
        node = node.next_functions[0][0]
    if _name(node) != "ViewBackward0":
        return None
    node = node.next_functions[0][0]
    if _name(node) not in ("AddmmBackward0", "MmBackward0"):
        return None
    addmm = _name(node) == "AddmmBackward0"
    mat1 = _next(node, 1 if addmm else 0, "ViewBackward0")
    t = _next(node, 2 if addmm else 1, "TBackward0")
    acc = None if t is None else t.next_functions[0][0]
    if mat1 is None or getattr(acc, "variable", None) is not module.out_proj.weight:
        return None
    A_o = node._saved_mat1 if addmm else node._saved_self
    node = mat1.next_functions[0][0]
    if _name(node) == "CloneBackward0":
        node = node.next_functions[0][0]
    if _name(node) != "PermuteBackward0" or tuple(node._saved_dims) != (2, 0, 1, 3):
        return None
    sdpa = node.next_functions[0][0]
    if _name(sdpa) != _SDPA_NODE or sdpa._saved_dropout_p != 0.0:
        return None
    views = [_next(sdpa, i, "ViewBackward0") for i in range(3)]
    if any(v is None for v in views) or len(set(views)) != 3:
        return None
    E, H = module.embed_dim, module.num_heads
    N, L, S = query.shape[bd], query.shape[1 - bd], key.shape[1 - bd]
    shapes = [(N, H, L, E // H), (N, H, S, E // H), (N, H, S, E // H)]
    saved = [sdpa._saved_query, sdpa._saved_key, sdpa._saved_value]
    if [tuple(x.shape) for x in saved] != shapes or tuple(A_o.shape) != (L * N, E):
        return None
    return [GradientEdge(v, 0) for v in views], A_o.detach().view(L, N, E)


def _from_graph(
    module: nn.MultiheadAttention,
    saved: Saved,
    grads: list[Tensor | None],
    dims: Dims,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``O`` ``[B, L, E]`` and the gradients of ``Q``, ``K``, ``V`` ``[B, K, T, E]`` from what
    :func:`_graph_edges` found and the engine's backward gave (``grads``: ``[B, K, H, T, E /
    H]``), or ``None`` when the call has none of it (the rule then recomputes)."""
    A_o = saved.data["a_o"]
    if A_o is None or len(grads) != 3:
        return None
    B, K, E, H = dims.B, dims.K, module.embed_dim, module.num_heads
    L, N, _ = A_o.shape
    S = saved.data["key"].shape[1 - saved.data["bd"]]
    Ts = (L, S, S)
    shapes = [(B, K, H, T, E // H) for T in Ts]
    if any(g is not None and tuple(g.shape) != t for g, t in zip(grads, shapes, strict=True)):
        return None
    if L == S and all(g is not None for g in grads):
        # The heads joined for all three in one copy (views of it: the rule concatenates them
        # for the in-projection, one more copy, instead of one copy each and then that one).
        qkv = torch.stack([g.transpose(2, 3) for g in grads], dim=3)  # type: ignore[union-attr]
        return (A_o.transpose(0, 1), *qkv.reshape(B, K, L, 3, E).unbind(3))
    out = []
    for g, T in zip(grads, Ts, strict=True):
        if g is None:
            out.append(torch.zeros(B, K, T, E, dtype=dtype, device=A_o.device))
        else:
            out.append(g.transpose(2, 3).reshape(B, K, T, E))
    return (A_o.transpose(0, 1), *out)


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
            h0 = d["hx"][0].to(wdt)
            c0 = d["hx"][1].to(wdt) if lstm else None
        else:
            h0 = x.new_zeros(L * nd, B, Hout, dtype=wdt)
            c0 = x.new_zeros(L * nd, B, H, dtype=wdt) if lstm else None
        P = {n: getattr(module, n).detach() for n in module._flat_weights_names}
        # Cotangents of the outputs, [K, B, ...]: the output sequence, h_n and c_n ([B, L nd, .]).
        shapes = [(T, nd * Hout), (L * nd, Hout)] + ([(L * nd, H)] if lstm else [])
        cots = []
        for D, shape in zip(deltas, shapes, strict=False):
            if D is None:
                cots.append(None)
            else:
                cots.append(_to_k_first(D.reshape(B, K, *shape)).to(wdt))
        with torch.no_grad():
            layers = _recurrent_forward(module, P, x.to(wdt), h0, c0)
            record = _recurrent_backward(module, P, layers, cots, K)
        factors: list[Factor] = []
        for name, A, G in record:  # G: [K, B, T, p]
            kind, sfx = name[:2], name[2:]
            w = _wanted(pidx, f"weight_{kind}{sfx}", want)
            b = _wanted(pidx, f"bias_{kind}{sfx}", want) if kind != "hr" else None
            D = G.transpose(0, 1).unsqueeze(0)  # [1, B, K, T, p]
            factors += _linear(w, b, A.unsqueeze(0), D, dtype)
        return factors


@dataclass
class _Direction:
    """What one direction of one layer kept in the forward pass (batch first, time order)."""

    sfx: str
    inp: Tensor  # [B, T, I]: the layer's input sequence (W_ih's inputs)
    prev: Tensor  # [B, T, Hout]: the hidden state before each step (W_hh's inputs)
    saved: tuple[Tensor, ...]  # [B, T, .] each: what the backward needs (see _cell_forward)
    m: Tensor | None  # [B, T, H]: an LSTM's unprojected o * tanh(c) (W_hr's inputs)


def _recurrent_forward(
    module: nn.Module, P: dict[str, Tensor], x: Tensor, h0: Tensor, c0: Tensor | None
) -> list[list[_Direction]]:
    """The module's forward pass, unrolled and without autograd, keeping what
    :func:`_recurrent_backward` needs."""
    L, nd = module.num_layers, 2 if module.bidirectional else 1
    T = x.shape[1]
    inp, layers = x, []
    for layer in range(L):
        dirs, outs = [], []
        for direction in range(nd):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            idx = layer * nd + direction
            gis = F.linear(inp, P["weight_ih" + sfx], P.get("bias_ih" + sfx)).unbind(1)
            h, c = h0[idx], None if c0 is None else c0[idx]
            w_hh, b_hh = P["weight_hh" + sfx], P.get("bias_hh" + sfx)
            w_hr = P.get("weight_hr" + sfx)
            hs, prev, saved, ms = [None] * T, [None] * T, [None] * T, [None] * T
            for t in range(T - 1, -1, -1) if direction else range(T):
                prev[t] = h
                gh = F.linear(h, w_hh, b_hh)
                h, c, saved[t], ms[t] = _cell_forward(module, gis[t], gh, h, c, w_hr)
                hs[t] = h
            m = None if ms[0] is None else torch.stack(ms, 1)
            stacked = tuple(torch.stack(v, 1) for v in zip(*saved, strict=True))
            dirs.append(_Direction(sfx, inp, torch.stack(prev, 1), stacked, m))
            outs.append(torch.stack(hs, 1))
        layers.append(dirs)
        inp = torch.cat(outs, -1) if nd > 1 else outs[0]
    return layers


def _cell_forward(
    module: nn.Module, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None, w_hr: Tensor | None
) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...], Tensor | None]:
    """One step: the new ``h`` (projected for an LSTM with ``proj_size``), ``c``, what the
    backward needs, and an LSTM's unprojected ``m = o * tanh(c)`` when projected (else
    ``None``)."""
    if isinstance(module, nn.GRU):
        Hd = h.shape[-1]
        rz = torch.sigmoid(gi[..., : 2 * Hd] + gh[..., : 2 * Hd])
        r, z = rz.chunk(2, -1)
        hn = gh[..., 2 * Hd :]
        n = torch.tanh(torch.addcmul(gi[..., 2 * Hd :], r, hn))
        return torch.addcmul(n, z, h - n), None, (rz, n, hn, h), None
    if isinstance(module, nn.LSTM):
        gates = gi + gh
        H = gates.shape[-1] // 4
        ifo = torch.sigmoid(gates)  # g's sigmoid unused: one op instead of three slices
        i, f, o = ifo[..., :H], ifo[..., H : 2 * H], ifo[..., 3 * H :]
        g = torch.tanh(gates[..., 2 * H : 3 * H])
        c_new = torch.addcmul(f * c, i, g)
        tc = torch.tanh(c_new)
        m = o * tc
        if w_hr is not None:
            return F.linear(m, w_hr), c_new, (ifo, g, c, tc), m
        return m, c_new, (ifo, g, c, tc), None
    pre = gi + gh
    h_new = torch.tanh(pre) if module.nonlinearity == "tanh" else torch.relu(pre)
    return h_new, None, (h_new,), None


def _coefficients(module: nn.Module, saved: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
    r"""Per step, the factors of the cell's backward that do not depend on the incoming
    gradients, formed for all steps at once (the sequential loop then does a few products).

    GRU (:math:`h' = n + z (h - n)`): :math:`\bar a_z = \bar h' (h - n) z (1 - z)`,
    :math:`\bar a_n = \bar h' (1 - z)(1 - n^2)`, :math:`\bar a_r = \bar a_n h_n r (1 - r)`;
    :math:`\bar{gi} = [\bar a_r, \bar a_z, \bar a_n]`, :math:`\bar{gh} = [\bar a_r, \bar a_z,
    r \bar a_n]`, :math:`\bar h = z \bar h' + \bar{gh} W_{hh}`. LSTM (:math:`c' = f c + i g`,
    :math:`m = o \tanh c'`): :math:`\bar c = \bar c' + \bar m\, o (1 - \tanh^2 c')`, gates
    :math:`[\bar c\, g\, i(1-i), \bar c\, c\, f(1-f), \bar c\, i (1-g^2), \bar m \tanh c'\,
    o(1-o)]` for ``gi`` and ``gh`` alike, :math:`\bar c_{prev} = \bar c f`. RNN:
    :math:`\bar h' \phi'(h')`."""
    if isinstance(module, nn.GRU):
        rz, n, hn, h = saved
        r, z = rz.chunk(2, -1)
        zn = torch.stack([(h - n) * z * (1 - z), (1 - z) * (1 - n * n)], -2)  # [B, T, 2, H]
        return _by_step(zn, hn * r * (1 - r), r, z)
    if isinstance(module, nn.LSTM):
        ifo, g, c, tc = saved
        H = g.shape[-1]
        i, f, o = ifo[..., :H], ifo[..., H : 2 * H], ifo[..., 3 * H :]
        ifg = torch.stack([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g)], -2)
        co, ct = tc * o * (1 - o), o * (1 - tc * tc)
        return _by_step(ifg, co, ct, f)
    (h_new,) = saved
    if module.nonlinearity == "tanh":
        slope = 1 - h_new * h_new
    else:
        slope = (h_new > 0).to(h_new.dtype)
    return _by_step(slope)


def _by_step(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """``[B, T, ...]`` tensors -> for each step ``t``, their slices ``[B, ...]``."""
    return list(zip(*(x.unbind(1) for x in tensors), strict=True))


def _recurrent_backward(
    module: nn.Module,
    P: dict[str, Tensor],
    layers: list[list[_Direction]],
    cots: list[Tensor | None],
    K: int,
) -> list[tuple[str, Tensor, Tensor]]:
    """The backward pass of :func:`_recurrent_forward` for the ``K`` cotangents ``cots`` of its
    outputs (``[K, B, ...]``, ``None`` for zero), with the steps of :func:`_coefficients`: for
    every linear map, ``(name, inputs [B, T, d], output gradients [K, B, T, p])``."""
    gru, lstm = isinstance(module, nn.GRU), isinstance(module, nn.LSTM)
    nd = len(layers[0])
    d_seq = cots[0]  # [K, B, T, nd Hout]: the top layer's output sequence
    d_hn, d_cn = cots[1], cots[2] if lstm else None
    record: list[tuple[str, Tensor, Tensor]] = []
    for layer in range(len(layers) - 1, -1, -1):
        d_below = None
        for direction, dr in enumerate(layers[layer]):
            idx = layer * nd + direction
            B, T, Hout = dr.prev.shape
            w_hh, w_hr = P["weight_hh" + dr.sfx], P.get("weight_hr" + dr.sfx)
            seq = None
            if d_seq is not None:
                seq = d_seq[..., direction * Hout : (direction + 1) * Hout].unbind(2)
            dh = dr.prev.new_zeros(K, B, Hout) if d_hn is None else d_hn[:, :, idx]
            dc = None if d_cn is None else d_cn[:, :, idx]
            coef = _coefficients(module, dr.saved)
            d_gh, d_h, a_ns = [None] * T, [None] * T, [None] * T
            for t in range(T) if direction else range(T - 1, -1, -1):
                if seq is not None:
                    dh = dh + seq[t]
                d_h[t] = dh
                if gru:
                    zn, cr, r, z = coef[t]
                    a_z, a_n = (dh.unsqueeze(-2) * zn).unbind(-2)
                    d_gh[t] = torch.cat([a_n * cr, a_z, a_n * r], -1)
                    a_ns[t] = a_n
                    dh = torch.addcmul(d_gh[t] @ w_hh, dh, z)
                elif lstm:
                    ifg, co, ct, f = coef[t]
                    dm = dh if w_hr is None else dh @ w_hr
                    dc = dm * ct if dc is None else torch.addcmul(dc, dm, ct)
                    d_gh[t] = torch.cat([(dc.unsqueeze(-2) * ifg).flatten(-2), dm * co], -1)
                    dh = d_gh[t] @ w_hh
                    dc = dc * f
                else:
                    d_gh[t] = dh * coef[t][0]
                    dh = d_gh[t] @ w_hh
            gh = torch.stack(d_gh, 2)  # [K, B, T, G H]
            if gru:  # gi's gradient differs from gh's in the n block only (no projection)
                gi = torch.cat([gh[..., : 2 * Hout], torch.stack(a_ns, 2)], -1)
            else:
                gi = gh
            record.append(("ih" + dr.sfx, dr.inp, gi))
            record.append(("hh" + dr.sfx, dr.prev, gh))
            if dr.m is not None:
                record.append(("hr" + dr.sfx, dr.m, torch.stack(d_h, 2)))
            if layer > 0:
                part = gi @ P["weight_ih" + dr.sfx]  # [K, B, T, nd Hout of the layer below]
                d_below = part if d_below is None else d_below + part
        d_seq = d_below  # the cotangent of the output sequence of the layer below
    return record


ATTENTION, RECURRENT = AttentionRule(), RecurrentRule()


def module_rule_for(module: nn.Module) -> tuple[ModuleRule, list[str]] | None:
    """The module rule of ``module`` and the parameters it claims, or ``None``."""
    for rule in (ATTENTION, RECURRENT):
        names = rule.claims(module)
        if names is not None:
            return rule, names
    return None
