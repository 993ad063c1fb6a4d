r"""The layer-wise engine: per-sample Gramians from layer inputs and output gradients.

When the loss of sample :math:`b` depends on sample :math:`b` only (per-sample losses, "IWRM"),
the gradient of :math:`L_b` with respect to a layer's weight only involves that layer's input
:math:`a_b` and the gradient :math:`\delta_b = \partial (\sum_c L_c) / \partial y_b` of the
summed losses with respect to its output, which **one** backward pass gives for every layer at
once. For ``nn.Linear`` applied at positions :math:`t = 1..T` (``T = 1`` or extra dimensions
flattened), :math:`\nabla_W L_b = \sum_t \delta_{bt} a_{bt}^\top`, so

.. math::
    G^{(W)}_{bc} = \sum_{t,s} (a_{bt} \cdot a_{cs})(\delta_{bt} \cdot \delta_{cs}),
    \qquad G^{(\text{bias})}_{bc} = \Big(\sum_t \delta_{bt}\Big)\cdot\Big(\sum_s \delta_{cs}\Big)

(``T = 1``: :math:`(AA^\top) \circ (\Delta\Delta^\top)` plus :math:`\Delta\Delta^\top`), and
the weighted gradient :math:`\sum_b w_b \nabla_W L_b = (w \odot \Delta)^\top A` comes from the
same tensors: no per-sample gradient and no second backward. ``nn.Conv1d/2d`` reduce to this
through ``unfold`` (``T`` = output positions, one block per group), ``nn.Embedding`` uses a Gram
over matching token indices, and the affine parameters of ``LayerNorm``, ``RMSNorm``,
``GroupNorm``, ``InstanceNorm*`` and eval-mode ``BatchNorm*`` have cheap, materialised
per-sample gradients (see :mod:`jdoptim.gramian._layers`).

**Ghost or materialised.** Per weight (after merging the calls of a shared layer), the engine
counts the multiply-adds of both routes, Gramian plus weighted gradient, for ``B`` samples,
``K`` losses per sample, ``T`` positions, ``G`` groups, input size ``d`` (``+1`` with a bias)
and output size ``p``:

.. math::
    \text{ghost} = G\,[(BT)^2 d + \min\{(BKT)^2 (p+1),\ (BT)^2 Kp + (BK)^2 Tp\} + BTpd],
    \qquad
    \text{materialised} = G\,[BKTpd + (BK)^2 pd + BKpd],

and takes the ghost route iff ghost :math:`\le` materialised (``strategy="auto"``). For one
loss per sample this is :math:`B T^2 (d+p+1) \lesssim p d (B + T)`, roughly
:math:`T^2 (d+p) < pd`: always ghost for ``T = 1``, materialised for long sequences and
convolutions with many output positions. (The differential-privacy rule :math:`2T^2 < pd`
compares the memory of per-sample *norms*; a Gramian also needs the cross-sample terms, whose
ghost cost grows as :math:`(BT)^2`.) For ``nn.Embedding`` with ``V`` rows: ghost
:math:`(BT)^2 + (BKT)^2(p+1)`, materialised :math:`(BK)^2 Vp + 2BKVp`.

**Exactness and fallbacks.** ``nn.MultiheadAttention`` (its ``out_proj`` included) and
``nn.RNN``/``GRU``/``LSTM`` have module rules (:mod:`jdoptim.gramian._modules`): one batched
recomputation of the module exposes its linear maps. Any other module that owns parameters
(``x * self.scale``, ``x + self.pos``, ``nn.PReLU``, ``nn.Bilinear``, a custom attention) has
the generic per-module rule (:mod:`jdoptim.gramian._permodule`): a ``vmap`` over the batch of the
module's own vector-Jacobian product gives the per-sample gradients of its direct parameters
(about one forward + backward of the module), after checking that the module is per-sample
separable. Parameters that no rule covers are differentiated exactly by a batched
vector-Jacobian product of the losses through the whole model (``torch.autograd.grad(...,
is_grads_batched=True)``, the per-sample gradients of those parameters only, about one backward
per sample): parameters of a covered module called on something that is not batched along
``batch_dim``, of modules that are never called, of parametrised or pruned modules, and of a
module that the generic rule gave up on (it mixes samples, or ``vmap`` fails on it; a module
found to mix samples sends *every* parameter to this fallback, since the rules of the layers
before it assume separable losses). A module called several times (shared /
tied layers) sums its calls: positions are concatenated, so the cross terms between calls are
exact; a parameter reached through different rules (an embedding tied to a linear head) is
materialised.

A rule covers a module only when it differentiates exactly the module's parameters
(:func:`~jdoptim.gramian._layers.rule_for`, checked again at every call by
:func:`~jdoptim.gramian._layers.exact_call`): pruned, weight- or spectral-normed, parametrised
modules, subclasses that override the computation, and calls with forward (pre-)hooks that may
change them take the fallback. So does a claimed parameter that the losses also use outside its
module's calls (``F.linear(x, emb.weight)``), found from the autograd graph in eager mode
(:mod:`jdoptim.gramian._graph`; under ``torch.compile`` the graph is hidden and the verdict of
the last eager :meth:`~LayerwiseGramianEngine.compute` is used).

Limits: modules that mix samples make per-sample losses non-separable:
``BatchNorm*`` with batch statistics raises, a module with parameters of its own under the
generic rule is checked (see above), other mixing (attention across the batch, a
``x - x.mean(0)`` between layers) cannot be detected. Module outputs must not be modified in
place (e.g. ``ReLU(inplace=True)`` right after a ``Linear``): that raises, unless
``clone_outputs=True``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._base import GramianEngine, GramianResult
from ._global import gather_batch
from ._graph import graph_visible, input_node, used_outside
from ._hooks import EngineHook
from ._kernels import accumulation_dtype
from ._layers import (
    FORMED_MAX_POSITIONS,
    GENERIC,
    Dims,
    EmbeddingFactor,
    Factor,
    FormedEmbeddingFactor,
    FormedLinearFactor,
    LinearFactor,
    PerSample,
    Rule,
    as_dtype,
    exact_call,
    factor_exponents,
    mixes_samples,
    rule_for,
)
from ._modules import ModuleRule, Saved, module_rule_for
from ._permodule import VmapRule, check_tolerance, host_readable
from ._scale import gram_shift, known_zero

if TYPE_CHECKING:
    from torch.autograd.graph import GradientEdge

    from ..distributed import Communicator

Strategy = Literal["auto", "ghost", "materialize"]
_STRATEGIES = ("auto", "ghost", "materialize")


class _Info:
    """Static facts about one hooked module."""

    def __init__(self, name: str, module: nn.Module, rule: Rule, pidx: dict[str, int]) -> None:
        self.name, self.module, self.rule, self.pidx = name, module, rule, pidx
        self.cls = type(module)
        self.params = dict(module._parameters)
        self.hook: object = None
        # Only a BatchNorm can mix samples (mixes_samples): the others skip that test per call.
        self.can_mix = isinstance(module, nn.modules.batchnorm._BatchNorm)


class _Record:
    """One call of a hooked module: what its rule saved, and its output (still in the graph)."""

    def __init__(
        self, info: _Info, saved: Tensor, output: Tensor, version: int, stop: object | None
    ) -> None:
        self.info, self.saved, self.output, self.version = info, saved, output, version
        self.stop = stop  # the grad_fn of the call's input (eager only, see _graph)


class _ModuleRecord:
    """One call of a module handled by a module rule (several inputs and outputs)."""

    def __init__(self, info: _Info, saved: Saved, versions: list[int], stops: set) -> None:
        self.info, self.saved, self.versions, self.stops = info, saved, versions, stops


class _Inexact:
    """A call of a covered module that its rule cannot differentiate (see ``exact_call``)."""

    def __init__(self, info: _Info) -> None:
        self.info = info


class LayerwiseResult(GramianResult):
    """The per-sample Gramian of one call, and the factors that rebuild weighted gradients."""

    def __init__(
        self,
        gramian: Tensor,
        params: Sequence[Tensor],
        slots: list[int | None],
        factors: list[Factor],
        dims: Dims,
        losses_shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.gramian = gramian
        self.params = list(params)
        self._slots = slots
        self._factors = factors
        self._dims = dims
        self._losses_shape = losses_shape
        self._dtype = dtype
        self.batch_dim = dims.loss_dim

    def to_global(
        self,
        comm: Communicator,
        losses: Tensor,
        batch_dim: int | None,
        sizes: list[int] | None,
    ) -> tuple[LayerwiseResult, Tensor]:
        """Per-sample objectives of the concatenated batch: all-gather every factor along its
        sample dimension (``B (T d + K T p)`` numbers per ``nn.Linear``), then the global
        Gramian and, later, the weighted gradient from the gathered factors (no gradient is
        all-reduced). ``losses`` have this result's shape (``sizes``: every rank's size along
        their batch dimension)."""
        dims = self._dims
        ld = dims.loss_dim
        losses = losses.detach()
        if tuple(losses.shape) != self._losses_shape:
            raise ValueError(
                f"Losses of shape {tuple(losses.shape)}; this result's are {self._losses_shape}."
            )
        factors, gdims, glob = gather_batch(self._factors, dims, comm, sizes, (losses, ld))
        assert glob is not None
        G, shift = scaled_gram(factors, gdims, self._dtype, self.gramian.device)
        gramian = LayerwiseGramianEngine._to_losses_order(G, glob.shape, gdims)
        result = LayerwiseResult(
            gramian.detach(), self.params, self._slots, factors, gdims, tuple(glob.shape),
            self._dtype,
        )  # fmt: skip
        result.gramian_exponent = 2 * shift
        return result, glob

    def _internal_weights(self, weights: Tensor) -> Tensor:
        dims = self._dims
        if weights.numel() != math.prod(self._losses_shape):
            raise ValueError(
                f"Expected {math.prod(self._losses_shape)} weights (losses of shape "
                f"{self._losses_shape}), got a tensor of shape {tuple(weights.shape)}."
            )
        w = weights.reshape(self._losses_shape).movedim(dims.loss_dim, 0)
        return as_dtype(w.reshape(dims.B, dims.K), self._dtype)

    def weighted_gradient(self, weights: Tensor) -> list[Tensor | None]:
        r"""Return :math:`\sum_i w_i \nabla_{\theta_p} L_i` for each parameter (``None`` where no
        loss reaches it). ``weights`` is flat ``[M]`` (row-major order of the losses) or has
        the losses' shape."""
        w = self._internal_weights(weights.detach())
        sums: dict[int, Tensor] = {}
        for factor in self._factors:
            for i, g in factor.weighted(w).items():
                sums[i] = g if i not in sums else sums[i] + g
        out: list[Tensor | None] = []
        for p, slot in zip(self.params, self._slots, strict=True):
            if slot is None or slot not in sums:
                out.append(None)
            else:
                g = sums[slot]
                out.append(as_dtype(g if g.shape == p.shape else g.reshape(p.shape), p.dtype))
        return out

    def backward(self, weights: Tensor) -> None:
        """Accumulate the weighted gradient into the parameters' ``.grad`` (like autograd)."""
        for p, g in zip(self.params, self.weighted_gradient(weights), strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g


class LayerwiseGramianEngine(GramianEngine):
    r"""Per-sample Gramians of a model from forward hooks and one backward pass.

    Construct it once on the model (it registers forward hooks); then, for each batch, run the
    forward pass, build per-sample losses, and call :meth:`compute`. See the module docstring
    for the formulas, the ghost / materialised rule and the fallbacks.

    :param modules: the modules to hook (all their sub-modules with parameters are hooked).
    :param batch_dim: the dimension of the losses and of every hooked layer's input and output
        that indexes samples (default 0; ``Conv*``, ``GroupNorm``, ``InstanceNorm*`` and
        ``BatchNorm*`` are covered only for ``batch_dim=0`` and use the exact fallback
        otherwise).
    :param strategy: ``"auto"`` (cheaper route per weight), ``"ghost"`` or ``"materialize"``
        (force one route, e.g. to compare them).
    :param clone_outputs: hand a copy of each hooked module's output to the rest of the model, so
        that in-place operations on it (``ReLU(inplace=True)``) do not invalidate the stored
        output (costs one copy per output).
    :param chunk_size: samples per ``vmap`` chunk of the generic per-module rule (``None``: the
        whole batch at once); bounds its memory to ``chunk_size`` per-sample recomputations.

    **Losses.** :meth:`compute` takes losses whose dimension ``batch_dim`` has size ``B`` (the
    batch size of the hooked layers) and whose other dimensions are ``K`` losses per sample
    (e.g. tasks, or positions): shape ``[B]`` or ``[B, K]`` for ``batch_dim=0``, ``[K, B]`` or
    ``[T, B]`` for ``batch_dim=1``, ... It returns the ``[M, M]`` Gramian, ``M = B K``, in the
    row-major order of ``losses.flatten()``; :func:`jdoptim.gramian.to_generalized_gramian`
    turns it into the generalized Gramian. The Gramian is in float32 or wider. A loss tensor
    without dimension ``batch_dim`` (e.g. a 0-d mean: use ``reduction="none"``), or whose
    dimension ``batch_dim`` has a size that no hooked layer saw along ``batch_dim`` (e.g.
    ``[K, B]`` losses with ``batch_dim=0``, or per-token losses flattened to ``[B T]``),
    raises ``ValueError``. A dimension of the right size that is not the batch (``[K, B]``
    losses with ``batch_dim=0`` and ``K = B``) cannot be told apart: declaring it is the
    same as declaring per-sample losses that are not.

    **Compile.** With ``torch._dynamo.config.trace_autograd_ops = True``, a function doing the
    forward pass, :meth:`compute`, a weighting and :meth:`LayerwiseResult.backward` compiles with
    ``fullgraph=True``; the backward passes keep the graph (``retain_graph=True``), and the
    stored inputs/outputs are dropped after each :meth:`compute`.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> engine = LayerwiseGramianEngine(model)
    >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
    >>> losses = ((model(x) - y) ** 2).sum(1)  # one loss per sample, shape [5]
    >>> params = list(model.parameters())
    >>> result = engine.compute(losses, params, retain_graph=True)  # differentiated again below
    >>> result.gramian.shape
    torch.Size([5, 5])
    >>> # Same as the Gramian of the per-sample gradients:
    >>> rows = [torch.cat([g.flatten() for g in torch.autograd.grad(l, params, retain_graph=True)])
    ...         for l in losses]
    >>> J = torch.stack(rows)
    >>> torch.allclose(result.gramian, J @ J.T, atol=1e-5)
    True
    >>> w = torch.full((5,), 0.2)
    >>> torch.allclose(torch.cat([g.flatten() for g in result.weighted_gradient(w)]), w @ J,
    ...                atol=1e-6)
    True
    >>> engine.remove()
    """

    name = "layerwise"
    materializes_jacobian = False
    shaped_losses = True

    def __init__(
        self,
        *modules: nn.Module,
        batch_dim: int = 0,
        strategy: Strategy = "auto",
        clone_outputs: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        if not modules:
            raise ValueError("LayerwiseGramianEngine needs at least one module to hook.")
        if not isinstance(batch_dim, int) or isinstance(batch_dim, bool) or batch_dim < 0:
            raise ValueError(f"`batch_dim` should be a non-negative int, but got {batch_dim!r}.")
        if strategy not in _STRATEGIES:
            raise ValueError(f"`strategy` should be one of {_STRATEGIES}, but got {strategy!r}.")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"`chunk_size` should be None or a positive int, got {chunk_size!r}.")
        self.chunk_size = chunk_size
        self._vmap_rule = VmapRule(batch_dim, chunk_size)
        # Modules the generic per-module rule gave up on (name -> reason), kept for later steps.
        self._vmap_failed: dict[str, str] = {}
        self._replaying = False  # inside the generic rule's recomputation: hooks record nothing
        self._vmapped: set[int] = set()  # engine indices of the parameters it claims
        self._mixing: set[str] = set()  # modules it found to mix samples (all take the fallback)
        self.batch_dim = batch_dim
        self.strategy = strategy
        self.clone_outputs = clone_outputs
        self._roots = modules
        self._params: list[nn.Parameter] = []
        self._index: dict[int, int] = {}
        self._infos: list[_Info] = []
        self._handles: list[RemovableHandle] = []
        self._records: list[_Record | _Inexact | _Info] = []
        self._generic: set[int] = set()  # engine indices of parameters only the fallback covers
        self._eager_calls = False  # a hook ran eagerly since the last compute
        # Engine indices of parameters used outside their module's calls at the last eager
        # compute (see _graph), also applied under torch.compile.
        self._outside: frozenset[int] = frozenset()
        seen: set[int] = set()
        for root in modules:
            for name, module in root.named_modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self._hook(name or type(module).__name__, module)
        # Parameters that only the generic per-module rule claims (its first-order check).
        owners: dict[int, int] = {}
        for info in self._infos:
            for i in set(info.pidx.values()):
                owners[i] = owners.get(i, 0) + 1
        self._vmap_only = frozenset(i for i in self._vmapped if owners.get(i) == 1)
        # The hooks hold the engine only weakly, so the model does not keep it alive; once it is
        # gone (e.g. with the JDOptimizer that built it), this finalizer unhooks the model.
        weakref.finalize(self, remove_handles, self._handles)

    # ------------------------------------------------------------------------------ hooking

    def _hook(self, name: str, module: nn.Module) -> None:
        claimed = module_rule_for(module)
        if claimed is not None:
            self._hook_module(name, module, *claimed)
            return
        direct = list(module.named_parameters(recurse=False))
        pidx: dict[str, int] = {}
        for pname, p in direct:
            if id(p) not in self._index:
                self._index[id(p)] = len(self._params)
                self._params.append(p)
            pidx[pname] = self._index[id(p)]
        can_mix = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if not direct and not can_mix:
            return
        rule = rule_for(module)
        if rule is GENERIC and not can_mix:
            names = self._vmap_rule.claims(module)
            if names is not None:  # the generic per-module rule (see _permodule)
                self._vmapped.update(pidx.values())
                self._hook_module(name, module, self._vmap_rule, names)
                return
        info = _Info(name, module, rule, pidx)
        self._infos.append(info)
        if rule is GENERIC:
            self._generic.update(pidx.values())
        if rule is GENERIC and not can_mix:
            return
        hook = self._make_hook(info)
        info.hook = hook
        self._handles.append(module.register_forward_hook(hook))

    def _make_hook(self, info: _Info) -> EngineHook:
        # Returns nothing (the output is unchanged) unless it clones the outputs.
        return EngineHook(self, LayerwiseGramianEngine._record_call, info,
                          passive=not self.clone_outputs)  # fmt: skip

    def _record_call(self, info: _Info, module: nn.Module, args: tuple, output: object) -> object:
        """The forward hook of a layer claimed by a layer rule (see :meth:`_make_hook`)."""
        if self._replaying or not torch.is_grad_enabled():
            return None
        eager = not torch.compiler.is_compiling()  # read once (called for every hooked call)
        if eager:
            self._eager_calls = True  # a hook ran eagerly (see compute)
        if info.can_mix and mixes_samples(module):
            self._records.append(info)
            return None
        if info.rule is GENERIC or not isinstance(output, Tensor):
            return None
        if not output.requires_grad:
            return None
        if not exact_call(module, info.cls, info.params, info.hook):
            self._records.append(_Inexact(info))
            return None
        saved = info.rule.save(module, args, output)
        if eager:  # the in-place check's version and the node of the call's first input
            self._records.append(_Record(info, saved, output, output._version, input_node(args)))
        else:
            self._records.append(_Record(info, saved, output, -1, None))
        return output.clone() if self.clone_outputs else None

    def _hook_module(
        self, name: str, module: nn.Module, rule: ModuleRule, names: list[str]
    ) -> None:
        """Hook a module that a module rule claims (its parameters ``names``)."""
        pidx: dict[str, int] = {}
        claimed: dict[str, Tensor] = {}
        for pname in names:
            p = module.get_parameter(pname)
            if id(p) not in self._index:
                self._index[id(p)] = len(self._params)
                self._params.append(p)
            pidx[pname] = self._index[id(p)]
            claimed[pname] = p
        info = _Info(name, module, rule, pidx)  # type: ignore[arg-type]
        self._infos.append(info)

        paths = [(*pname.split("."), p) for pname, p in claimed.items()]
        hook = EngineHook(self, LayerwiseGramianEngine._record_module_call, info, rule, paths)
        info.hook = hook
        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _record_module_call(
        self,
        info: _Info,
        rule: ModuleRule,
        claimed: list[tuple],
        module: nn.Module,
        args: tuple,
        kwargs: dict,
        output: object,
    ) -> None:
        """The forward hook of a module claimed by a module rule (see :meth:`_hook_module`)."""
        if self._replaying or not torch.is_grad_enabled():
            return None
        eager = not torch.compiler.is_compiling()  # read once (called for every hooked call)
        if eager:
            self._eager_calls = True  # a hook ran eagerly (see compute)
        same = True
        for path in claimed:  # a loop: cheaper than all() over a generator (every call)
            if _parameter_at(module, path[:-1]) is not path[-1]:
                same = False
                break
        saved = None
        ok = info.name not in self._vmap_failed
        if ok and same and exact_call(module, info.cls, info.params, info.hook):
            saved = rule.save(module, args, kwargs, output)
        if saved is None:
            self._records.append(_Inexact(info))
            return None
        if not any(o.requires_grad for o in saved.outputs):
            return None
        versions = [t._version for t in (*saved.outputs, *saved.inputs)] if eager else []
        stops = {t.grad_fn for t in saved.inputs if eager and t.grad_fn is not None}
        self._records.append(_ModuleRecord(info, saved, versions, stops))
        return None

    def remove(self) -> None:
        """Remove the hooks and drop whatever they stored (also done when the engine is garbage
        collected)."""
        remove_handles(self._handles)
        self.reset()

    def __reduce__(self) -> tuple:
        """``copy.deepcopy`` and ``pickle``: a new engine on the (copied) modules, hooked anew
        (what a copied model carries of this engine's hooks is inert, see ``_hooks``)."""
        kwargs = {"batch_dim": self.batch_dim, "strategy": self.strategy,
                  "clone_outputs": self.clone_outputs, "chunk_size": self.chunk_size}  # fmt: skip
        return (rebuild_engine, (type(self), self._roots, kwargs))

    def reset(self) -> None:
        """Drop the inputs/outputs stored since the last :meth:`compute` (e.g. after a forward
        pass that is not followed by one)."""
        self._records = []
        self._eager_calls = False
        self._replaying = False

    # ------------------------------------------------------------------------------ compute

    def _dims(
        self,
        losses: Tensor,
        records: list[_Record],
        loss_dim: int | None,
        sizes: tuple[int, ...] = (),
    ) -> Dims:
        """``B`` and ``K`` of ``losses``; raises when their dimension ``loss_dim`` cannot be the
        batch (missing, or of a size that no hooked layer saw along ``self.batch_dim``)."""
        bd = self.batch_dim if loss_dim is None else loss_dim
        if isinstance(bd, bool) or not isinstance(bd, int) or bd < 0:
            raise ValueError(f"`batch_dim` should be None or an int >= 0, but got {bd!r}.")
        layer_dim = self.batch_dim
        shape = tuple(losses.shape)
        if losses.numel() == 0:
            raise ValueError("`losses` is empty.")
        if losses.ndim <= bd:
            hint = (
                " A single (0-d) loss is a mean over the batch: compute the loss with "
                'reduction="none" to get one loss per sample.'
                if losses.ndim == 0
                else ""
            )
            raise ValueError(f"`losses` of shape {shape} has no batch dimension {bd}.{hint}")
        B = losses.shape[bd]
        seen = {r.output.shape[layer_dim] for r in records if r.output.ndim > layer_dim}
        seen = sorted(seen | set(sizes))
        if (records or sizes) and B not in seen:
            raise ValueError(
                f"Dimension {bd} (`batch_dim`) of the losses, of shape {shape}, has size {B}, "
                f"but the hooked layers saw batches of size {seen} along dimension {layer_dim}: "
                "it cannot be the batch. Give the losses with the batch along `batch_dim` "
                "(e.g. per-sample losses of shape [B] or [B, K] with batch_dim=0, [K, B] or "
                "[T, B] with batch_dim=1; reshape per-token losses flattened to [B T] back to "
                "[B, T]). The engine's own batch_dim is the model's (its layers' inputs and "
                f"outputs, here {layer_dim}): for a batch-first model with [K, B] losses, use "
                "engine=LayerwiseGramianEngine(model, batch_dim=0) with batch_dim=1."
            )
        return Dims(B=B, K=losses.numel() // B, batch_dim=layer_dim, loss_dim=bd)

    def _output_grads(
        self,
        losses: Tensor,
        outputs: list[Tensor | GradientEdge],
        dims: Dims,
        bdims: list[int],
        extra: Sequence[Tensor] = (),
        retain_graph: bool = True,
    ) -> list[Tensor | None]:
        """:math:`\\partial L_{\\cdot k} / \\partial y` for every stored output (or edge of
        the graph), as ``[B, K, *other dims]`` (one backward; ``K`` batched backwards when
        ``K > 1``);
        ``bdims`` holds each output's batch dimension. Then, for each of ``extra`` (parameters),
        :math:`\\sum_b \\partial L_{bk} / \\partial \\theta` as ``[K, n]`` (same backward)."""
        if not outputs:
            return []
        ld = dims.loss_dim
        n = len(outputs)
        if dims.K == 1:
            grads = torch.autograd.grad(
                losses.sum(), [*outputs, *extra], retain_graph=retain_graph, allow_unused=True
            )
            out: list[Tensor | None] = [
                None if g is None else (g if bd == 0 else g.movedim(bd, 0)).unsqueeze(1)
                for g, bd in zip(grads[:n], bdims, strict=True)
            ]
            return out + [None if g is None else _dense(g).reshape(1, -1) for g in grads[n:]]
        moved = losses.movedim(ld, 0)
        eye = torch.eye(dims.K, dtype=losses.dtype, device=losses.device)
        E = eye[:, None, :].expand(dims.K, dims.B, dims.K).reshape(dims.K, *moved.shape)
        E = E.movedim(1, ld + 1)
        grads = torch.autograd.grad(
            losses,
            [*outputs, *extra],
            grad_outputs=E,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        out = [
            None if g is None else g.movedim(bd + 1, 0)
            for g, bd in zip(grads[:n], bdims, strict=True)
        ]
        return out + [None if g is None else _dense(g).reshape(dims.K, -1) for g in grads[n:]]

    def _fallback(
        self, losses: Tensor, params: list[Tensor], dims: Dims, retain_graph: bool
    ) -> list[Tensor | None]:
        """Exact per-sample gradients ``[B, K, n]`` of ``params`` (batched vjp of the losses)."""
        M = losses.numel()
        eye = torch.eye(M, dtype=losses.dtype, device=losses.device).reshape(M, *losses.shape)
        grads = torch.autograd.grad(
            losses,
            params,
            grad_outputs=eye,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        out: list[Tensor | None] = []
        for g in grads:
            if g is None:
                out.append(None)
                continue
            g = g.reshape(*losses.shape, -1).movedim(dims.loss_dim, 0)
            out.append(g.reshape(dims.B, dims.K, -1))
        return out

    def compute(
        self,
        losses: Tensor,
        params: Sequence[Tensor],
        *,
        retain_graph: bool = False,
        batch_dim: int | None = None,
    ) -> LayerwiseResult:
        """The Gramian of ``losses`` (per-sample, see the class docstring) with respect to
        ``params``, from the calls stored since the last :meth:`compute` (which are dropped).

        ``batch_dim`` is the batch dimension of ``losses`` when it differs from the model's
        (the engine's ``batch_dim``), e.g. ``1`` for ``[K, B]`` losses of a batch-first model.
        The graph of ``losses`` is freed by the call (as by ``backward()``; the rules need
        only their one backward, which frees it) unless ``retain_graph``: differentiating
        ``losses`` again afterwards needs ``retain_graph=True``.
        """
        if torch.compiler.is_compiling() and self._eager_calls:
            # Some calls ran eagerly (a graph break inside the forward, e.g. an nn.GRU, which
            # Dynamo does not trace unless torch._dynamo.config.allow_rnn): their outputs are
            # outside the graph being traced, whose autograd.grad cannot reach them. Compute
            # eagerly instead (exact; only the JD part leaves the graph).
            return self._compute_eagerly(
                losses, params, retain_graph=retain_graph, batch_dim=batch_dim
            )
        self._eager_calls = False
        self._replaying = False  # (a recomputation that raised under torch.compile)
        # Empty the list in place: under torch.compile a new list would leave the old one, with
        # the tensors of this step, to be rebuilt as graph outputs.
        records = list(self._records)
        self._records.clear()
        mixing = sorted({r.name for r in records if isinstance(r, _Info)})
        inexact = [r.info for r in records if isinstance(r, _Inexact)]
        if mixing:
            raise ValueError(
                "These modules mix the samples of a batch, so per-sample losses are not "
                f"separable and the layer-wise engine does not apply: {mixing} (BatchNorm with "
                "batch statistics: use eval mode with running statistics, GroupNorm/LayerNorm, "
                "or the Jacobian engine)."
            )
        calls: list[_Record] = [r for r in records if isinstance(r, _Record)]
        mcalls: list[_ModuleRecord] = [r for r in records if isinstance(r, _ModuleRecord)]
        dims = self._dims(losses, calls, batch_dim, tuple(r.saved.batch for r in mcalls))
        params = list(params)
        slots = [self._index.get(id(p)) for p in params]
        wanted = {s for s in slots if s is not None}

        # Which calls are per-sample; parameters of any other call go to the fallback.
        invalid: set[int] = set(self._generic)
        for info in inexact:
            invalid.update(info.pidx.values())
        valid: list[_Record] = []
        for r in calls:
            ok = (
                r.output.ndim > dims.batch_dim
                and r.output.shape[dims.batch_dim] == dims.B
                and r.info.rule.valid(r.info.module, r.saved, r.output, dims)
            )
            if ok:
                valid.append(r)
            else:
                invalid.update(r.info.pidx.values())
            # In-place check, eager only (under compile ``_version`` is not a traced constant).
            if not torch.compiler.is_compiling() and r.output._version != r.version:
                raise ValueError(
                    f"The output of module {r.info.name!r} was modified in place after its "
                    "forward pass (e.g. by ReLU(inplace=True)); use inplace=False or "
                    "LayerwiseGramianEngine(..., clone_outputs=True)."
                )
        mvalid: list[_ModuleRecord] = []
        for r in mcalls:
            sv = r.saved
            ok = sv.batch == dims.B and all(
                o.ndim > bd and o.shape[bd] == dims.B
                for o, bd in zip(sv.outputs, sv.out_dims, strict=True)
            )
            if ok:
                mvalid.append(r)
            else:
                invalid.update(r.info.pidx.values())
            tensors = (*sv.outputs, *sv.inputs)
            if not torch.compiler.is_compiling() and any(
                t._version != v for t, v in zip(tensors, r.versions, strict=True)
            ):
                raise ValueError(
                    f"An input or output of module {r.info.name!r} was modified in place after "
                    "its forward pass; the engine needs them as they were."
                )
        covered = {i for r in [*valid, *mvalid] for i in r.info.pidx.values()} - invalid
        covered &= wanted
        if covered and graph_visible():
            # Claimed parameters that the losses also use outside the recorded calls; the
            # verdict is kept for compiled steps, which cannot see the graph.
            uses = [
                (r.output, r.stop, [self._params[i] for i in r.info.pidx.values() if i in covered])
                for r in valid
            ]
            for r in mvalid:
                ps = [self._params[i] for i in r.info.pidx.values() if i in covered]
                uses += [(o, r.stops, ps) for o in r.saved.outputs]
            outside = used_outside([losses], uses)
            self._outside = frozenset(i for i in covered if id(self._params[i]) in outside)
            del uses  # (it holds the outputs, released after the backward below)
        covered -= self._outside
        if self._mixing:  # a module was found to mix samples: no rule applies (see below)
            covered = set()

        def want(i: int) -> bool:
            return i in covered

        valid = [r for r in valid if any(want(i) for i in r.info.pidx.values())]
        mvalid = [r for r in mvalid if any(want(i) for i in r.info.pidx.values())]
        outs: list[Tensor | GradientEdge] = [r.output for r in valid]
        bdims = [dims.batch_dim] * len(valid)
        for r in mvalid:  # a module rule may also want gradients at edges inside the call
            outs += [*r.saved.outputs, *r.saved.edges]
            bdims += [*r.saved.out_dims, *r.saved.edge_dims]
        # Parameters that only the generic per-module rule claims: their batched gradients come
        # from the same backward, for its first-order check (see _permodule).
        checked = list(
            dict.fromkeys(
                i
                for r in mvalid
                if isinstance(r.info.rule, VmapRule)
                for i in r.info.pidx.values()
                if want(i) and i in self._vmap_only
            )
        )
        # The graph of the losses is needed after this backward only by the exact fallback (for
        # the parameters no rule covers, or those of a generic call whose check fails): without
        # it, it is freed like ``backward()`` frees it, unless ``retain_graph``.
        fallback_ahead = (
            self._mixing
            or any(s is None or s not in covered for s in slots)
            or any(isinstance(r.info.rule, VmapRule) for r in mvalid)
        )
        keep = retain_graph or fallback_ahead or torch.compiler.is_compiling()
        deltas = self._output_grads(
            losses, outs, dims, bdims, [self._params[i] for i in checked], keep
        )
        totals = dict(zip(checked, deltas[len(outs) :], strict=True))
        dtype = accumulation_dtype(losses.dtype, *(o.dtype for o in outs if isinstance(o, Tensor)))
        eager = not torch.compiler.is_compiling()
        if eager:
            # The layers' outputs are not needed after the backward (their rules read what
            # their hooks saved and the gradients): let those no other tensor keeps go before
            # the Gramian's blocks are formed (W4: about 0.8 MB less held then).
            del outs
            for r in calls:
                r.output = None  # type: ignore[assignment]

        # The generic per-module rule first: a call whose check fails sends its module's
        # parameters to the fallback, and the other rules must then leave them alone too.
        pos = len(valid)
        vmapped: list[PerSample] = []
        late: set[int] = set()
        for r in mvalid:
            n = len(r.saved.outputs) + len(r.saved.edges)
            Ds = [None if D is None else as_dtype(D, dtype) for D in deltas[pos : pos + n]]
            pos += n
            if isinstance(r.info.rule, VmapRule) and any(D is not None for D in Ds):
                grads = self._vmap_grads(r, Ds, dims, want, dtype)
                if grads is None:
                    late.update(r.info.pidx.values())
                else:
                    vmapped.append(PerSample(grads))
        if late:
            covered -= late
            vmapped = [PerSample({i: g for i, g in f.grads.items() if i not in late})
                       for f in vmapped]  # fmt: skip
        vmapped = self._check_sums(vmapped, totals, mvalid)
        if self._mixing:
            # A module mixes samples, so the losses are not per-sample separable and the rules
            # of the layers before it would be wrong too: everything takes the exact fallback.
            covered.clear()
            valid, mvalid, vmapped = [], [], []

        factors: list[Factor] = list(vmapped)
        for k, (r, D) in enumerate(zip(valid, deltas, strict=False)):
            if D is not None:
                D = as_dtype(D, dtype)
                factors += r.info.rule.factors(r.info.module, r.info.pidx, r.saved, D, dims, want)
            if eager:  # the factors keep what they need, no more (e.g. a norm's input)
                deltas[k] = None
                r.saved = None  # type: ignore[assignment]
            del D
        pos = len(valid)
        for r in mvalid:
            n = len(r.saved.outputs) + len(r.saved.edges)
            Ds = [None if D is None else as_dtype(D, dtype) for D in deltas[pos : pos + n]]
            deltas[pos : pos + n] = [None] * n  # the factors keep what they need, no more
            pos += n
            if any(D is not None for D in Ds) and not isinstance(r.info.rule, VmapRule):
                rule: ModuleRule = r.info.rule  # type: ignore[assignment]
                factors += rule.factors(r.info.module, r.info.pidx, r.saved, Ds, dims, want)
            del Ds

        # Exact fallback for the wanted parameters that no rule covers.
        fb_pos = [k for k, s in enumerate(slots) if s is None or s not in covered]
        pool = PerSample({})
        fb_slots: list[int | None] = list(slots)
        if fb_pos:
            keep = retain_graph or torch.compiler.is_compiling()
            next_slot = len(self._params)
            fb_params = [params[k] for k in fb_pos]
            for k, J in zip(fb_pos, self._fallback(losses, fb_params, dims, keep), strict=True):
                fb_slots[k] = next_slot
                if J is not None:
                    pool.add({next_slot: as_dtype(J, dtype)})
                next_slot += 1

        prepared = self._prepare(factors, pool)
        G, shift = scaled_gram(prepared, dims, dtype, losses.device)
        gramian = self._to_losses_order(G, losses.shape, dims)
        result = LayerwiseResult(
            gramian.detach(), params, fb_slots, prepared, dims, tuple(losses.shape), dtype
        )
        result.gramian_exponent = 2 * shift
        return result

    def _check_sums(
        self,
        vmapped: list[PerSample],
        totals: dict[int, Tensor | None],
        records: list[_ModuleRecord],
    ) -> list[PerSample]:
        """The generic rule's first-order check: per parameter, the per-sample gradients
        summed over the batch (and over the module's calls) must equal the batched gradient of
        the losses (``totals``), in Euclidean norm up to ``tol`` times the sum of the per-sample
        norms. Eager on the CPU: on a mismatch the owning modules are marked as mixing samples
        (everything takes the fallback); elsewhere: NaN, no host read."""
        sums: dict[int, Tensor] = {}
        scales: dict[int, Tensor] = {}
        for f in vmapped:
            for i, J in f.grads.items():
                if i in totals:
                    # In norm (two passes over J): |sum_b g_b - g| <= tol * sum_b |g_b|, per loss.
                    s, a = J.sum(0), torch.linalg.vector_norm(J, dim=-1).sum(0)
                    sums[i] = s if i not in sums else sums[i] + s
                    scales[i] = a if i not in scales else scales[i] + a
        if not sums:
            return vmapped
        flags = []
        for i, s in sums.items():
            total = totals[i]
            diff = s if total is None else s - total.to(s.dtype)
            tol = check_tolerance(self._params[i].dtype)
            flags.append((torch.linalg.vector_norm(diff, dim=-1) > tol * scales[i]).any())
        bad = torch.stack(flags).any()
        if host_readable(bad):
            # Eager on the CPU only: one host read of the check.
            if bool(bad):
                failed = {i for i, flag in zip(sums, flags, strict=True) if bool(flag)}
                names = {r.info.name for r in records if set(r.info.pidx.values()) & failed}
                for name in names:
                    self._vmap_failed[name] = (
                        "per-sample gradients do not sum to the batch gradient: the module "
                        "mixes samples (or a parameter is used outside it), every parameter "
                        "takes the fallback"
                    )
                self._mixing.update(names)
            return vmapped
        return [
            PerSample({i: torch.where(bad, J.new_full((), float("nan")), J)
                       for i, J in f.grads.items()})
            for f in vmapped
        ]  # fmt: skip

    def _vmap_grads(
        self, r: _ModuleRecord, Ds: list[Tensor | None], dims: Dims, want, dtype: torch.dtype
    ) -> dict[int, Tensor] | None:
        """Per-sample gradients of a call handled by the generic per-module rule (see
        :mod:`jdoptim.gramian._permodule`), or ``None`` when its parameters must take the
        fallback (the verdict is kept for later steps)."""
        info = r.info
        rule: VmapRule = info.rule  # type: ignore[assignment]
        names = [n for n, i in info.pidx.items() if want(i)]
        if not names:
            return {}
        if torch.compiler.is_compiling():
            self._replaying = True
            grads, bad = rule.gradients(info.module, names, r.saved, Ds, dims)
            self._replaying = False
        else:
            self._replaying = True
            try:
                grads, bad = rule.gradients(info.module, names, r.saved, Ds, dims)
            except Exception as e:  # noqa: BLE001 (eager: any vmap failure takes the fallback)
                message = " ".join(str(e).split())[:160]
                self._vmap_failed[info.name] = f"vmap failed: {type(e).__name__}: {message}"
                grads = None
            finally:
                self._replaying = False
        if grads is None and torch.compiler.is_compiling():
            # Outputs of other shapes (static): separability cannot be checked without a host
            # read, so the Gramian is NaN (an eager step records the verdict instead).
            return {
                info.pidx[n]: torch.full(
                    (dims.B, dims.K, info.module.get_parameter(n).numel()), float("nan"),
                    dtype=dtype, device=r.saved.outputs[0].device,
                )
                for n in names
            }  # fmt: skip
        if grads is None:
            reason = self._vmap_failed.setdefault(
                info.name, "outputs of other shapes when recomputed per sample"
            )
            # Eager (host reads, once per module: the verdict is kept): does the module mix
            # samples? Then the rules of the layers before it are wrong too: everything takes
            # the fallback. (A random module cannot be checked; like nn.Dropout between layers,
            # it is taken as per-sample.)
            self._replaying = True
            try:
                verdict = rule.probe(info.module, r.saved)
            finally:
                self._replaying = False
            if verdict == "mixing":
                self._vmap_failed[info.name] = (
                    f"{reason}; and calls on single samples do not give the batch's outputs: "
                    "the module mixes samples, every parameter takes the fallback"
                )
                self._mixing.add(info.name)
            elif verdict == "random":
                self._vmap_failed[info.name] = f"{reason}; the module is random"
            return None
        if host_readable(bad):
            # Eager on the CPU only: one host read of the separability check.
            if bool(bad):
                self._vmap_failed[info.name] = (
                    "outputs differ when recomputed per sample: the module mixes samples, "
                    "every parameter takes the fallback"
                )
                self._mixing.add(info.name)
                return None
        else:
            # No host read: a failed check makes the Gramian NaN (the nonfinite policy).
            nan = torch.full((), float("nan"), dtype=dtype, device=bad.device)
            grads = [torch.where(bad, nan, g.to(dtype)) for g in grads]
        return {info.pidx[n]: g.to(dtype) for n, g in zip(names, grads, strict=True)}

    @torch.compiler.disable
    def _compute_eagerly(
        self,
        losses: Tensor,
        params: Sequence[Tensor],
        *,
        retain_graph: bool = False,
        batch_dim: int | None = None,
    ) -> LayerwiseResult:
        return self.compute(losses, params, retain_graph=retain_graph, batch_dim=batch_dim)

    def _prepare(self, factors: list[Factor], pool: PerSample) -> list[Factor]:
        return prepare_factors(factors, pool, self.strategy)

    @staticmethod
    def _to_losses_order(G: Tensor, shape: torch.Size, dims: Dims) -> Tensor:
        """``[B, K, B, K]`` -> ``[M, M]`` in the row-major order of losses of ``shape``."""
        M = dims.B * dims.K
        ld = dims.loss_dim
        if ld == 0:
            return G.reshape(M, M)
        moved = (dims.B, *shape[:ld], *shape[ld + 1 :])
        n = len(shape)
        G = G.reshape(*moved, *moved)
        G = G.movedim(0, ld).movedim(n, n + ld)
        return G.reshape(M, M)

    def __repr__(self) -> str:
        return (
            f"LayerwiseGramianEngine(batch_dim={self.batch_dim}, strategy={self.strategy!r}, "
            f"clone_outputs={self.clone_outputs}"
            + ("" if self.chunk_size is None else f", chunk_size={self.chunk_size}")
            + ")"
        )

    def report(self) -> dict[str, str]:
        """Which rule handles each hooked module: ``"generic"`` is the exact batched-vjp
        fallback through the whole model, ``"vmap"`` the generic per-module rule, and
        ``"generic (reason)"`` a module that this rule gave up on (it mixes samples, or ``vmap``
        failed on it)."""
        out = {}
        for info in self._infos:
            reason = self._vmap_failed.get(info.name)
            out[info.name] = info.rule.name if reason is None else f"generic ({reason})"
        return out


def _parameter_at(module: nn.Module, path: tuple[str, ...]) -> object:
    """``module.get_parameter(".".join(path))``, or ``None`` where there is none (a direct walk
    through ``_modules``: ``get_parameter`` costs about 3 us, and module rules check theirs at
    every call)."""
    for name in path[:-1]:
        module = module._modules.get(name)  # type: ignore[assignment]
        if module is None:
            return None
    return module._parameters.get(path[-1])


def _dense(g: Tensor) -> Tensor:
    """A gradient as a strided tensor (a sparse one from ``F.embedding(..., sparse=True)``)."""
    return g if g.layout == torch.strided else g.to_dense()


def remove_handles(handles: list[RemovableHandle]) -> None:
    """Remove hooks and empty the list (an engine's :meth:`remove` and its finalizer)."""
    for handle in handles:
        handle.remove()
    handles.clear()


def scaled_gram(
    factors: list[Factor], dims: Dims, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``[B, K, B, K]`` Gramian of the factors' gradients scaled by ``2**-shift``, and the
    shift (``0`` unless the gradients are huge or tiny: see :mod:`jdoptim.gramian._scale`)."""
    shift = gram_shift(factor_exponents(factors), dtype, device)
    # A shift known to be 0 (eager CPU) is read once here, not by every factor: None (no scaling).
    s = None if known_zero(shift) else shift
    grams = [g for g in (f.gram(dims, s) for f in factors) if g is not None]
    if not grams:
        return torch.zeros(dims.B, dims.K, dims.B, dims.K, dtype=dtype, device=device), shift
    # One stack and one sum (not one addition per factor).
    return torch.stack([as_dtype(g, dtype) for g in grams]).sum(0), shift


def formed_cheaper(f: LinearFactor) -> bool:
    """Whether ``f``'s per-sample gradients are better formed per block and dropped
    (:class:`~jdoptim.gramian._layers.FormedLinearFactor`) than stored: at most
    :data:`~jdoptim.gramian._layers.FORMED_MAX_POSITIONS` positions per loss and sample."""
    K, T = f.D.shape[2], f.D.shape[3]
    return T <= FORMED_MAX_POSITIONS * K


def prepare_factors(factors: list[Factor], pool: PerSample, strategy: Strategy) -> list[Factor]:
    """Merge the calls of shared weights and pick ghost or materialised per weight.

    Factors of a weight reached through several rules (or also in ``pool``) are materialised
    and summed into ``pool``; the others are concatenated per weight and kept as ghost factors
    when that route is cheaper (``strategy="auto"``) or forced. Returns the factors to
    evaluate, ``pool`` last when it holds anything.
    """
    groups: dict[tuple, list[Factor]] = {}
    for f in factors:
        if isinstance(f, PerSample):
            pool.add(f.grads)
        else:
            groups.setdefault(f.key, []).append(f)
    owners: dict[int, int] = {}
    for fs in groups.values():
        for i in fs[0].params:
            owners[i] = owners.get(i, 0) + 1
    out: list[Factor] = []
    for fs in groups.values():
        shared = any(owners[i] > 1 or i in pool.grads for i in fs[0].params)
        if shared:  # reached through several rules: materialise and sum
            for f in fs:
                pool.add(f.materialize(), f.exponent())
            continue
        merged = type(fs[0]).concat(fs)  # type: ignore[arg-type]
        ghost, mat = merged.costs()
        use_ghost = strategy == "ghost" or (strategy == "auto" and ghost <= mat)
        if use_ghost:
            out.append(merged)
        elif isinstance(merged, LinearFactor) and formed_cheaper(merged):
            out.append(FormedLinearFactor.of(merged))  # per-sample gradients dropped after use
        elif isinstance(merged, EmbeddingFactor):
            # Formed per block and dropped too: its weighted gradient from the indices and
            # output gradients reads B K T p numbers, not the B K V p stored gradients.
            out.append(FormedEmbeddingFactor.of(merged))
        else:
            pool.add(merged.materialize(), merged.exponent())
    if pool.grads:
        out.append(pool)
    return out


__all__ = ["LayerwiseGramianEngine", "LayerwiseResult"]

_ = (EmbeddingFactor, LinearFactor)  # re-exported types for documentation


def rebuild_engine(cls: type, args: tuple, kwargs: dict) -> GramianEngine:
    """Build an engine anew from its constructor's arguments (the engines' ``__reduce__``)."""
    return cls(*args, **kwargs)
