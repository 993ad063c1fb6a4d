r"""The generic per-module rule: per-sample gradients of a module's own parameters by ``vmap``.

For a module that owns parameters used directly in its ``forward`` (``x * self.scale``,
``x + self.pos``, ``nn.PReLU``, ``nn.Bilinear``, a custom attention with its own projection
weights) and that no specific rule claims, the per-sample gradient of those parameters is

.. math::
    g_{bk} = \Big(\frac{\partial f(x_b; \theta)}{\partial \theta}\Big)^{\!\top} \delta_{bk},
    \qquad \delta_{bk} = \frac{\partial L_{bk}}{\partial y_b},

where :math:`f(\cdot;\theta)` is the module applied to **one** sample :math:`x_b` (a batch of
one: the batch dimension is kept, of size 1, so the module sees its usual layout) and
:math:`\delta` comes from the engine's one ordinary backward (the gradients at the module's
recorded outputs). The rule evaluates it as one ``torch.func.vmap`` over the batch (chunked by
the engine's ``chunk_size``) of ``torch.func.vjp`` of ``torch.func.functional_call(module, ...)``,
differentiating the module's **direct** parameters only (``module._parameters``): its
children's parameters enter as detached constants, so the children's own rules (or this rule on
them) count their uses once. Per sample and loss it costs one forward and one backward of the
module alone, about one batched forward + backward of the module in all, against one backward of
the *whole model* per sample for the engine's fallback.

**Separability is checked, not assumed.** The rule holds only when output :math:`b` of the
module depends on input :math:`b` alone. The vmapped recomputation also returns the module's
per-sample outputs :math:`f(x_b;\theta)`; they must equal the recorded batched outputs (max
difference :math:`\le \sqrt{\varepsilon}\,\max|y|`, :math:`\varepsilon` the output dtype's
machine epsilon). A module that mixes samples (``x - x.mean(0)``, attention across the batch)
fails that check. A second, first-order check covers mixing that leaves the outputs unchanged at
the current parameters (``y = x + a * x.mean(0)`` with ``a = 0``): for each parameter that only
this rule claims, the per-sample gradients summed over the batch must equal the batched gradient
of the losses, which the engine's one backward also returns (in norm, same tolerance,
relative to :math:`\sum_b \|g_b\|`). In eager mode on the CPU the engine reads the verdicts
(one host read each) and, on a mismatch, differentiates **every** parameter with its exact
whole-model fallback, since the rules of the layers before a mixing module assume separable
losses too (the verdict is kept for later steps, compiled ones included). Where a host read is
not allowed (under ``torch.compile``, on accelerators) the verdict poisons the module's
per-sample gradients with NaN through ``torch.where``: the Gramian is NaN, which
:class:`~jdoptim.JDOptimizer`'s ``nonfinite`` policy reports (``"raise"`` by default), never a
silently wrong Gramian. ``vmap`` runs with ``randomness="error"`` (dropout, random ops), and
an eager ``vmap`` failure (an op without a batching rule that cannot fall back, a data-dependent
branch, an in-place update of a buffer, ``nn.GRU`` under ``functional_call``) also sends the
module to the fallback, with the reason in
:meth:`~jdoptim.gramian.LayerwiseGramianEngine.report`; the engine then calls the module on each
sample alone, without ``vmap`` (:meth:`VmapRule.probe`, once): if that does not give the batch's
outputs (a hand-written batch norm with an in-place running mean, a branch on the whole batch),
every parameter takes the fallback, as for a failed check. A random module (two calls on the
batch differ) cannot be checked: like ``nn.Dropout`` between layers, it is taken as per-sample
and only its own parameters take the fallback. Under
``torch.compile`` a ``vmap`` failure raises instead (a traced step cannot retry eagerly), and
outputs of other shapes make the Gramian NaN: one eager step first records the verdict, which
compiled steps then follow. Buffers enter the recomputations as copies, so an in-place update of
one there does not change the model.

**Limits.** Mixing that changes neither the outputs nor the batch sum of the gradients at the
current parameters passes both checks. Under ``torch.compile``, where the autograd graph is
hidden, a parameter of the module that the losses also use outside it fails the first-order
check (NaN) unless an eager step sent it to the fallback first. Inputs are per-sample when
their dimension ``batch_dim`` has the batch size, other tensors are shared by all samples (a
mask ``[T, T]`` with ``T = B`` is mistaken for a batched input, which the output check then
reports). Calls with no batched input, or with an output that requires grad and is not
batched, are left to the fallback. A module with parameters of its own nested in another one is
recomputed once per level (the parent's recomputation runs the child with its parameters
fixed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._layers import Dims
from ._modules import ModuleRule, Saved


def check_tolerance(dtype: torch.dtype) -> float:
    r"""Relative tolerance of the checks: :math:`\sqrt{\varepsilon}` of ``dtype``.

    >>> round(check_tolerance(torch.float32), 6)
    0.000345
    """
    return torch.finfo(dtype).eps ** 0.5 if dtype.is_floating_point else 0.0


def host_readable(flag: Tensor) -> bool:
    """Whether the check's verdict ``flag`` may be read on the host: eager, on the CPU."""
    return not torch.compiler.is_compiling() and flag.device.type == "cpu"


class VmapRule(ModuleRule):
    """The generic per-module rule (see the module docstring), for one engine's ``batch_dim``
    and ``chunk_size``."""

    name = "vmap"

    def __init__(self, batch_dim: int, chunk_size: int | None) -> None:
        self.batch_dim, self.chunk_size = batch_dim, chunk_size

    def claims(self, module: nn.Module) -> list[str] | None:
        if parametrize.is_parametrized(module):
            return None
        if isinstance(module, (parametrize.ParametrizationList, nn.Embedding)):
            # A parametrisation is not called on the batch; an Embedding only lands here when
            # sparse or scale_grad_by_freq, whose backward is not per sample.
            return None
        if getattr(module, "sparse", False) or getattr(module, "scale_grad_by_freq", False):
            return None  # nn.EmbeddingBag and the like: sparse or batch-scaled gradients
        if module._forward_pre_hooks:
            # prune / the old weight_norm compute the weight in one: every call would fall back
            # (exact_call), so the report says so from the start.
            return None
        names = [n for n, p in module._parameters.items() if p is not None]
        return names or None

    def save(self, module, args, kwargs, output):
        if module._forward_pre_hooks:  # FSDP2's (exact_call allows them): not on DTensors
            return None
        bd = self.batch_dim
        out_leaves, _ = tree_flatten(output)
        pos = [j for j, o in enumerate(out_leaves) if isinstance(o, Tensor) and o.requires_grad]
        if not pos:
            return None
        outputs = [out_leaves[j] for j in pos]
        B = outputs[0].shape[bd] if outputs[0].ndim > bd else -1
        if B < 0 or any(o.ndim <= bd or o.shape[bd] != B for o in outputs):
            return None
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if any(x.is_nested or x.layout != torch.strided for x in tensors):
            return None
        batched = [
            i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.ndim > bd
            and x.shape[bd] == B
        ]  # fmt: skip
        if not batched:
            return None
        consts = [x.detach() if isinstance(x, Tensor) else x for x in leaves]
        data = {"leaves": consts, "spec": spec, "batched": batched, "out_pos": pos}
        return Saved(outputs, [bd] * len(outputs), tensors, B, data)

    def gradients(
        self,
        module: nn.Module,
        names: list[str],
        saved: Saved,
        deltas: list[Tensor | None],
        dims: Dims,
    ) -> tuple[list[Tensor] | None, Tensor]:
        """Per-sample gradients ``[B, K, n]`` of the parameters ``names`` (direct), and a 0-d
        bool tensor: whether the per-sample recomputation's outputs differ from the recorded
        ones (no host read). ``deltas[j]`` is ``[B, K, *output j's dims but the batch]``.
        ``None`` gradients: the outputs have other shapes (known without reading data)."""
        d, bd, B, K = saved.data, self.batch_dim, dims.B, dims.K
        leaves, spec, batched, out_pos = d["leaves"], d["spec"], d["batched"], d["out_pos"]
        primals = tuple(module.get_parameter(n).detach() for n in names)
        own = set(names)
        frozen: dict[str, Tensor] = {
            n: p.detach()
            for n, p in module.named_parameters(remove_duplicate=False)
            if n not in own
        }
        frozen.update(
            (n, b.clone()) for n, b in module.named_buffers(remove_duplicate=False)
        )  # copies: an in-place update in the recomputation leaves the model as it is
        # Each sample is a batch of one (the batch dimension kept, of size 1), so the module
        # sees its usual layout: [B, *shape with 1 at bd] for inputs, outputs and cotangents.
        ref = [o.detach().movedim(bd, 0).unsqueeze(bd + 1) for o in saved.outputs]
        cots = []
        for D, o in zip(deltas, ref, strict=True):
            shape = (B, K, *o.shape[1:])
            cots.append(o.new_zeros(shape) if D is None else D.reshape(shape).to(o.dtype))

        def one(xs: list[Tensor], ds: list[Tensor]) -> tuple[tuple[Tensor, ...], tuple]:
            full = list(leaves)
            for i, x in zip(batched, xs, strict=True):
                full[i] = x
            args, kwargs = tree_unflatten(full, spec)

            def f(*ps: Tensor) -> tuple[Tensor, ...]:
                values = {**frozen, **dict(zip(names, ps, strict=True))}
                out = torch.func.functional_call(module, values, args, kwargs, tie_weights=False)
                outl, _ = tree_flatten(out)
                return tuple(outl[j] for j in out_pos)

            outs, vjp_fn = torch.func.vjp(f, *primals)
            if K == 1:
                grads = tuple(g.unsqueeze(0) for g in vjp_fn(tuple(c[0] for c in ds)))
            else:
                grads = torch.func.vmap(vjp_fn, randomness="error")(tuple(ds))
            return outs, grads

        xs = [leaves[i].unsqueeze(bd + 1) for i in batched]
        # The math form of scaled_dot_product_attention batches under vmap; the fused CPU
        # kernels have no batching rule (vmap would loop over the samples).
        with sdpa_kernel([SDPBackend.MATH]):
            outs, grads = torch.func.vmap(
                one, in_dims=(bd, 0), randomness="error", chunk_size=self.chunk_size
            )(xs, cots)
        bad = torch.zeros((), dtype=torch.bool, device=ref[0].device)
        for o, r in zip(outs, ref, strict=True):
            if o.shape != r.shape:  # static: known at trace time too
                return None, torch.ones((), dtype=torch.bool, device=bad.device)
            tol = check_tolerance(r.dtype)
            scale = r.abs().amax() if r.numel() else r.new_zeros(())
            bad = bad | ((o - r).abs().amax() > tol * scale)
        return [g.reshape(B, K, -1) for g in grads], bad

    def probe(self, module: nn.Module, saved: Saved) -> str:
        """Eager only (host reads): ``"separable"``, ``"random"`` or ``"mixing"``, from calls of
        the module without ``vmap`` or grad, its buffers copied each time: two calls on the
        whole batch (``"random"`` when they differ), then one call per sample (a batch of one),
        which must give the first call's outputs (``"mixing"`` otherwise, or when any call
        fails). The engine asks when ``vmap`` cannot run the module."""
        d, bd, B = saved.data, self.batch_dim, saved.batch
        leaves, spec, batched, out_pos = d["leaves"], d["spec"], d["batched"], d["out_pos"]
        params = {n: p.detach() for n, p in module.named_parameters(remove_duplicate=False)}
        buffers = dict(module.named_buffers(remove_duplicate=False))

        def call(full: list) -> list:
            args, kwargs = tree_unflatten(full, spec)
            values = {**params, **{n: t.clone() for n, t in buffers.items()}}
            out = torch.func.functional_call(module, values, args, kwargs, tie_weights=False)
            outl, _ = tree_flatten(out)
            return [outl[j] for j in out_pos]

        def differ(a: object, b: Tensor) -> bool:
            if not isinstance(a, Tensor) or a.shape != b.shape:
                return True
            tol = check_tolerance(b.dtype) * float(b.abs().amax()) if b.numel() else 0.0
            return b.numel() > 0 and float((a - b).abs().amax()) > tol

        try:
            with torch.no_grad():
                first, second = call(list(leaves)), call(list(leaves))
                if any(differ(a, b) for a, b in zip(second, first, strict=True)):
                    return "random"
                for b in range(B):
                    full = list(leaves)
                    for i in batched:
                        full[i] = leaves[i].narrow(bd, b, 1)
                    outs = call(full)
                    refs = [o.narrow(bd, b, 1) for o in first]
                    if any(differ(o, r) for o, r in zip(outs, refs, strict=True)):
                        return "mixing"
        except Exception:  # noqa: BLE001 (cannot tell: the safe answer)
            return "mixing"
        return "separable"
