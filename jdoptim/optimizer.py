r"""``JDOptimizer``: Jacobian descent as a drop-in ``torch.optim.Optimizer``.

A step runs the pipeline losses → Gramian engine (:mod:`jdoptim.gramian`) → weighting
(:mod:`jdoptim.aggregation`) → weighted gradient in ``.grad`` (:func:`jdoptim.jd_backward`) →
the inner optimizer's ``step()``.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import _scalarized
from ._compile import configure_compile as _configure_compile
from ._functional import (
    NonFiniteError,
    NonFinitePolicy,
    OtherParamsGrad,
    WeightingStrategy,
    jd_backward,
)
from .aggregation._base import Aggregator, GeneralizedWeighting, Stateful, Weighting
from .aggregation._losses import LossAware
from .distributed import (
    DistributedMode,
    check_sharded,
    check_supported,
    fsdp2_unsharded,
    resolve_mode,
)
from .gramian import GramianEngine, resolve_engine
from .scalarization import Scalarizer


class _StepRecord:
    """Mutable per-step bookkeeping, kept out of the optimizer object itself: Dynamo does not
    replay attribute writes on ``torch.optim.Optimizer`` instances made inside a compiled region,
    but it does on plain objects."""

    def __init__(self) -> None:
        self.last_weights: Tensor | None = None
        self.last_gramian: Tensor | None = None
        self.skipped_steps = 0
        self.skip_next = False
        self.pending_ok: Tensor | None = None


def _batch_dim(batch_dim: int | None, engine: GramianEngine) -> int | None:
    """The batch dimension of the losses: ``batch_dim``, else the engine's own (the model's)."""
    if batch_dim is not None and (
        isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0
    ):
        raise ValueError(f"`batch_dim` should be None or an int >= 0, but got {batch_dim!r}.")
    return getattr(engine, "batch_dim", None) if batch_dim is None else batch_dim


class JDOptimizer(torch.optim.Optimizer):
    r"""Wrap a torch optimizer so that it follows Jacobian descent on several losses.

    For losses :math:`L` (any shape, ``M`` entries) a step computes the Gramian
    :math:`G = J J^\top` of their Jacobian :math:`J` with respect to the parameters, weights
    :math:`w` from ``weighting``, writes the update direction :math:`J^\top w` into ``.grad``
    (accumulating, like ``backward``) and calls the inner optimizer.

    ``param_groups``, ``state`` and ``defaults`` *are* the inner optimizer's objects, so LR
    schedulers and ``torch.amp.GradScaler`` work on a ``JDOptimizer`` as on the inner one.

    :param optimizer: the inner optimizer (SGD, Adam, AdamW, ...). The JD parameters are its
        parameters that require grad at the time of each call; a parameter no loss reaches keeps
        its ``.grad`` unchanged.
    :param weighting: a Gramian :class:`~jdoptim.aggregation.Weighting` (e.g.
        ``UPGradWeighting()``), a :class:`~jdoptim.aggregation.GeneralizedWeighting`, or an
        :class:`~jdoptim.aggregation.Aggregator`. A Gramian-weighted aggregator (``UPGrad()``)
        is used through its ``gramian_weighting``; a Jacobian-only one (``ConFIG``,
        ``GradDrop``, ``TrimmedMean``, ``NashMTL``) gets the materialised Jacobian and its
        output becomes ``.grad``. A plain ``Weighting`` given losses of shape
        ``[m1, ..., mk]`` (``k >= 2``) is wrapped in :class:`~jdoptim.aggregation.Flattening`.
    :param params: partial JD: only these parameters (a subset of the inner optimizer's) take
        part in the Jacobian; the others get the gradient of :math:`w^\top L`
        (``other_params_grad="weighted"``) or of :math:`\sum_i L_i` (``"sum"``, torchjd's
        ``mtl_backward`` convention for task heads). ``None``: all parameters.
    :param other_params_grad: see ``params``.
    :param engine: ``"auto"``, ``"jacobian"``, ``"layerwise"``, another registered engine name,
        or a :class:`~jdoptim.gramian.GramianEngine`. ``"auto"`` takes the layer-wise engine
        (per-sample Gramians from layer inputs and output gradients, no per-sample gradients,
        no second backward) when ``model`` and ``batch_dim`` are given and the aggregator needs
        no Jacobian, and the batched-vjp Jacobian engine otherwise. For a multi-task model
        (shared trunk, one head per task) pass
        ``MultiTaskGramianEngine(model.trunk, model.heads)``
        (:class:`~jdoptim.gramian.MultiTaskGramianEngine`): same update, far cheaper.
    :param model: the module whose layers the layer-wise engine hooks (per-sample losses).
    :param batch_dim: the batch dimension of per-sample losses (``losses`` of shape ``[B]`` or
        ``[B, K]`` with ``batch_dim=0``, ``[K, B]`` or ``[T, B]`` with ``batch_dim=1``):
        declares that the losses at index ``b`` of that dimension depend on sample ``b`` only.
        Losses without that dimension (a 0-d mean: use ``reduction="none"``) raise
        ``ValueError``, and so, with the layer-wise engine, does a dimension whose size no
        hooked layer saw as its batch. ``None``: the engine's ``batch_dim`` when it has one.
        ``engine="auto"`` / ``"layerwise"`` hook the model with the same batch dimension (a
        sequence-first model for ``batch_dim=1``); for a batch-first model with ``[K, B]``
        losses pass ``engine=LayerwiseGramianEngine(model, batch_dim=0)`` and ``batch_dim=1``.
    :param chunk_size: rows of the Jacobian per backward pass for the Jacobian engine (``None``:
        all at once; ``1``: no ``vmap``); for the layer-wise engine, samples per ``vmap`` chunk of
        its generic per-module rule.
    :param nonfinite: what to do when the losses or the Gramian hold NaN/inf: ``"raise"``
        (default; :class:`~jdoptim.NonFiniteError`, parameters, gradients and optimizer state
        untouched), ``"skip"`` (same, but the step is skipped silently and counted in
        ``skipped_steps``) or ``"propagate"`` (no check: the only mode without a host sync, and
        the one to use with ``GradScaler``, which detects the inf gradients itself). The check
        costs one device-to-host read per ``backward``; under ``torch.compile`` the read is
        deferred to the next :meth:`step` (which breaks the graph anyway) and the gradients are
        written masked, so a bad ``backward`` still leaves them unchanged. A non-finite
        ``backward`` makes the next :meth:`step` raise or skip.
    :param configure_compile: call :func:`jdoptim.configure_compile` (lets ``torch.compile``
        trace the autograd calls of a step).
    :param distributed: ``"auto"`` (default: the global step when ``torch.distributed`` is
        initialised with more than one rank, else single-process), ``"global"``, ``"local"``
        or ``"off"``; see :mod:`jdoptim.distributed` and the distributed-training docs page.
        Resolved on the first :meth:`backward`.
    :param process_group: the group of the distributed step (``None``: the default group).

    Gradient accumulation: each :meth:`backward` computes its own Gramian and weights from its
    own losses and *adds* :math:`J_k^\top w_k` to ``.grad``; after ``K`` calls ``.grad`` holds
    :math:`\sum_k J_k^\top w_k` (for the mean over micro-batches, divide the losses by ``K``,
    as in ordinary accumulation). This is not JD on the concatenated losses of all micro-batches.

    Monitoring: ``last_weights`` and ``last_gramian`` hold the (detached) weights and ``[M, M]``
    Gramian of the last :meth:`backward` (e.g. ``(G @ w) >= 0`` checks that the update
    conflicts with no objective).

    >>> import torch
    >>> from jdoptim.aggregation import UPGradWeighting
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting())
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> opt.zero_grad()
    >>> weights = opt.step(((model(x) - y) ** 2).mean(0))  # two losses, one per output
    >>> weights.shape
    torch.Size([2])
    >>> bool((opt.last_gramian @ opt.last_weights >= -1e-6).all())
    True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weighting: Weighting | GeneralizedWeighting | Aggregator | Scalarizer,
        *,
        params: Iterable[Tensor] | None = None,
        other_params_grad: OtherParamsGrad = "weighted",
        engine: str | GramianEngine = "auto",
        model: torch.nn.Module | None = None,
        batch_dim: int | None = None,
        chunk_size: int | None = None,
        nonfinite: NonFinitePolicy = "raise",
        configure_compile: bool = True,
        distributed: DistributedMode = "auto",
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "`optimizer` should be a torch.optim.Optimizer. Found "
                f"`{type(optimizer).__name__}`."
            )
        if isinstance(optimizer, JDOptimizer):
            raise TypeError("`optimizer` is already a JDOptimizer.")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "LBFGS is not supported as the inner optimizer: it re-evaluates a closure several "
                "times per step, while a JD step computes the update from one evaluation."
            )
        if distributed not in ("auto", "global", "local", "off"):
            raise ValueError(
                "`distributed` should be one of ('auto', 'global', 'local', 'off'), but got "
                f"{distributed!r}."
            )
        every = [p for g in optimizer.param_groups for p in g["params"]]
        if distributed != "off":
            check_supported(every, model)  # DeepSpeed, FSDP1
        # Deliberately not calling Optimizer.__init__: param_groups/state/defaults are the inner
        # optimizer's (properties below). Only the hook registries it would create are needed.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.optimizer = optimizer
        self.weighting = weighting
        # A Scalarizer (loss level): one backward of the scalarized loss, no Gramian engine.
        self._scalarizer = weighting if isinstance(weighting, Scalarizer) else None
        if self._scalarizer is not None:
            if params is not None:
                raise ValueError("`params` (partial JD) has no meaning with a Scalarizer.")
            _scalarized.attach_trainable_params(optimizer, self._scalarizer)
            self._strategy, self.engine, self.batch_dim = None, None, batch_dim
            self._loss_aware: list[LossAware] = []
        else:
            self._strategy = WeightingStrategy(weighting)
            self._loss_aware = [m for m in weighting.modules() if isinstance(m, LossAware)]
            self.engine = resolve_engine(
                engine,
                chunk_size=chunk_size,
                needs_jacobian=self._strategy.needs_jacobian,
                model=model,
                batch_dim=batch_dim,
            )
            self.batch_dim = _batch_dim(batch_dim, self.engine)
        from ._functional import _OTHER, _POLICIES

        if nonfinite not in _POLICIES:
            raise ValueError(f"`nonfinite` should be one of {_POLICIES}, but got {nonfinite!r}.")
        if other_params_grad not in _OTHER:
            raise ValueError(
                f"`other_params_grad` should be one of {_OTHER}, but got {other_params_grad!r}."
            )
        self.nonfinite: NonFinitePolicy = nonfinite
        self.other_params_grad: OtherParamsGrad = other_params_grad
        self._jd_ids: frozenset[int] | None = None
        if params is not None:
            jd = list(params)
            if isinstance(params, Tensor) or not jd:
                raise ValueError("`params` should be a non-empty iterable of parameters.")
            if len(_unique(jd)) != len(jd):  # as torch.optim does for a param group
                warnings.warn(
                    "`params` lists a parameter more than once; it takes part in the Jacobian "
                    "once.",
                    stacklevel=2,
                )
            inner = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(id(p) not in inner for p in jd):
                raise ValueError("Every tensor of `params` must be a parameter of `optimizer`.")
            if other_params_grad == "weighted" and not self._strategy.has_weights:
                raise ValueError(
                    f"{weighting!r} produces no weights; use other_params_grad='sum' with it."
                )
            self._jd_ids = frozenset(id(p) for p in jd)
        if model is not None:
            try:
                _check_sparse_embeddings(model, self._split_params()[0])
            except ValueError:
                self.close()  # unhook now rather than when garbage collected
                raise
        if configure_compile:
            _configure_compile()

        self._record = _StepRecord()
        self.distributed: DistributedMode = distributed
        self.process_group = process_group
        self._comm_resolved = distributed == "off"
        self._comm = None
        self._fsdp2 = None
        try:
            if self.engine is not None:  # a Scalarizer has no engine (an ordinary backward)
                check_sharded(every, self.engine, distributed)
                if self.engine.name == "jacobian":
                    self._fsdp2 = fsdp2_unsharded(model, every)
        except TypeError:
            if not isinstance(engine, GramianEngine) and hasattr(self.engine, "remove"):
                self.engine.remove()  # the hooks of an engine built here
            raise

    # -- monitoring ------------------------------------------------------------------------------
    @property
    def last_weights(self) -> Tensor | None:
        """Detached weights of the last :meth:`backward` (shape of its losses)."""
        return self._record.last_weights

    @property
    def last_gramian(self) -> Tensor | None:
        """Detached ``[M, M]`` Gramian of the last :meth:`backward`."""
        return self._record.last_gramian

    @property
    def communicator(self) -> Any:
        """The :class:`~jdoptim.distributed.Communicator` of the distributed step (``None``:
        single process, or not resolved yet: it is resolved on the first :meth:`backward`)."""
        return self._comm

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of non-finite losses or Gramian."""
        return self._record.skipped_steps

    # -- the inner optimizer's objects ----------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the inner optimizer's parameters (its own ``zero_grad``;
        under ``torch.compile`` an equivalent traceable loop, since torch marks
        ``Optimizer.zero_grad`` as not traceable)."""
        if not torch.compiler.is_compiling():
            self.optimizer.zero_grad(set_to_none=set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None  # unconditionally: no guard on the grad, no recompilation
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    # -- Jacobian descent -----------------------------------------------------------------------
    def _split_params(self) -> tuple[list[Tensor], list[Tensor]]:
        # Deduplicated: a parameter listed twice (torch.optim warns) gets its gradient once.
        trainable = _unique(p for g in self.param_groups for p in g["params"] if p.requires_grad)
        if self._jd_ids is None:
            return trainable, []
        jd = [p for p in trainable if id(p) in self._jd_ids]
        other = [p for p in trainable if id(p) not in self._jd_ids]
        return jd, other

    def backward(self, losses: Tensor, *, retain_graph: bool = False) -> Tensor | None:
        """Accumulate the JD direction of ``losses`` into ``.grad`` and return the weights.

        Only fills ``.grad``: clip, accumulate over more calls or unscale, then call
        :meth:`step` with no losses. Returns the detached weights (shape of ``losses``; NaN when
        the step is skipped; ``None`` for a Jacobian-only aggregator without weights). Works
        under ``torch.no_grad()`` like ``loss.backward()``: the losses carry their graph.
        """
        if not self._comm_resolved:  # once: a single process then never looks again
            self._comm = resolve_mode(self.distributed, self.process_group)
            self._comm_resolved = True
        if self._scalarizer is not None:
            if self._comm is not None:
                # Checked before any backward: nothing is written when it is refused.
                raise NotImplementedError(
                    f"A Scalarizer ({type(self._scalarizer).__name__}) has no "
                    f"distributed={self.distributed!r} step yet: each rank would scalarize its "
                    "own losses and the replicas would drift. Wrap the model in "
                    "DistributedDataParallel and pass distributed='off' (DDP then averages the "
                    "gradients; a stateful scalarizer sees each rank's own losses)."
                )
            with torch.enable_grad():  # as for JD below: the losses carry their graph
                skipped = _scalarized.scalarized_backward(
                    self._scalarizer, losses, self.nonfinite, retain_graph
                )
            if skipped:
                self._record.skip_next = True
            return None
        for module in self._loss_aware:  # GradNorm, DB-MTL: they read the losses too
            module.observe_losses(losses)
        jd, other = self._split_params()
        try:
            with torch.enable_grad():
                out = jd_backward(
                    losses,
                    jd,
                    self._strategy,
                    self.engine,
                    other_params=other,
                    other_params_grad=self.other_params_grad,
                    nonfinite=self.nonfinite,
                    retain_graph=retain_graph,
                    comm=self._comm,
                    batch_dim=getattr(self, "batch_dim", None),
                    engine_params=None if self._fsdp2 is None else self._unsharded(jd),
                )
        except NotImplementedError as error:
            _explain_sparse_gradients(losses, jd, error)
            raise
        record = self._record
        if out.skipped:
            record.skip_next = True
        if out.ok is not None:
            record.pending_ok = out.ok if record.pending_ok is None else record.pending_ok & out.ok
        record.last_weights = out.weights
        record.last_gramian = out.gramian
        return out.weights

    def _unsharded(self, params: list[Tensor]) -> list[Tensor]:
        """FSDP2: the unsharded parameters the forward pass used, for the sharded ones."""
        assert self._fsdp2 is not None
        return [
            self._fsdp2[id(p)].unsharded_param if id(p) in self._fsdp2 else p  # type: ignore[attr-defined]
            for p in params
        ]

    @torch.no_grad()
    def _take_step(self) -> None:
        if self._record.skip_next or self._record.pending_ok is not None:
            if self._resolve_pending():
                return
        self.optimizer.step()

    @torch.compiler.disable
    def _resolve_pending(self) -> bool:
        """Read the deferred finiteness flag (one host read); return whether to skip."""
        record = self._record
        ok, record.pending_ok = record.pending_ok, None
        skip, record.skip_next = record.skip_next, False
        if ok is not None and not bool(ok):
            if self.nonfinite == "raise":
                raise NonFiniteError(
                    "A backward since the last step had NaN or inf losses or Gramian; its "
                    "gradients were not written and the step is not taken."
                )
            skip = True
        if skip:
            record.skipped_steps += 1
        return skip

    def step(  # type: ignore[override]
        self,
        losses: Tensor | None = None,
        closure: Callable[[], Tensor] | None = None,
    ) -> Tensor | None:
        """Take a JD step and return the weights.

        * ``step(losses)``: :meth:`backward` then the inner optimizer's step;
        * ``step()``: the inner optimizer's step on the ``.grad`` already there (e.g. after
          :meth:`backward`, clipping, accumulation);
        * ``step(closure=fn)``: ``fn()`` (run with grad enabled, once) returns the losses; then
          as ``step(losses)``. Optimizers that re-evaluate the closure (LBFGS) are not supported.
          A callable given positionally is taken as the closure (``opt.step(fn)``, torch's
          convention, which wrappers such as Accelerate's ``AcceleratedOptimizer`` follow).
        """
        if callable(losses) and not isinstance(losses, Tensor):
            if closure is not None:
                raise ValueError("Give either `losses` or `closure`, not both.")
            losses, closure = None, losses
        if closure is not None:
            if losses is not None:
                raise ValueError("Give either `losses` or `closure`, not both.")
            with torch.enable_grad():
                losses = closure()
        weights = None
        if losses is not None:
            weights = self.backward(losses)
            # Drop the reference so that, under torch.compile, the losses are not an output of
            # the JD graph (the inner step below breaks the graph).
            del losses
        skipped_before = self._record.skipped_steps
        self._take_step()
        if closure is not None and hasattr(self._scalarizer, "update"):
            if self._record.skipped_steps == skipped_before:  # the step was taken
                with torch.no_grad():
                    self._scalarizer.update(closure())  # FAMO: the new losses, same batch
        return weights

    def update_scalarizer(self, new_losses: Tensor) -> None:
        """Give a scalarizer that learns from the losses' decrease (:class:`~jdoptim.
        scalarization.FAMO`) the losses after the last step: ``scalarizer.update(new_losses)``.
        ``step(closure=fn)`` does it itself (re-evaluating ``fn`` without grad)."""
        if not hasattr(self._scalarizer, "update"):
            raise TypeError(f"{self.weighting!r} has no `update`.")
        self._scalarizer.update(new_losses)

    # -- checkpointing -------------------------------------------------------------------------
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict, plus the JD extras under one key, ``"jdoptim"``.

        ``state`` and ``param_groups`` (and any other top-level key of the inner optimizer) are
        the inner optimizer's, so tools that read ``state_dict()["state"]`` or rebuild the
        dict from those two keys (``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict``, Lightning, Accelerate) see a standard optimizer state
        dict. ``state_dict()["jdoptim"]`` holds the weighting's ``nn.Module`` state dict
        (``"weighting"``), the step counters (``"skipped_steps"``) and the format
        (``"version"``). As with torch optimizers, the tensors are references to the live
        state: copy them (or save them) before training on.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = dict(self.optimizer.state_dict())
        state_dict[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "weighting": self.weighting.state_dict(),
            "skipped_steps": self._record.skipped_steps,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict saved by :meth:`state_dict`; nothing changes when it is refused.

        Three formats load:

        * this version's (the inner optimizer's state dict plus ``"jdoptim"``);
        * jdoptim 0.1.0's (``{"optimizer": ..., "weighting": ..., "skipped_steps": ...}``);
        * a plain state dict of the inner optimizer (``state`` and ``param_groups`` only:
          migrating a run to JD, or ``torch.distributed.checkpoint``'s
          ``set_optimizer_state_dict``): the inner optimizer's state is loaded, and the
          weighting starts fresh (every :class:`~jdoptim.aggregation.Stateful` module is
          reset) with ``skipped_steps = 0``.

        Everything is checked before anything is written (the inner optimizer's parameter
        groups, the weighting's keys and shapes, on a copy of the weighting), so a refused
        state dict raises ``ValueError`` or ``TypeError`` and leaves the inner optimizer, the
        weighting and the counters untouched.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"`state_dict` should be a mapping. Found `{type(state_dict).__name__}`."
            )
        state_dict = dict(state_dict)  # shallow copy, as torch's optimizers do
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result

        # 1. Validate everything (no writes).
        inner, extras = _split_state_dict(state_dict)
        _check_inner_state_dict(self.optimizer, inner)
        weighting_state = None
        skipped_steps = 0
        if extras is not None:
            weighting_state = extras["weighting"]
            skipped_steps = extras["skipped_steps"]
            probe = copy.deepcopy(self.weighting)
            try:
                probe.load_state_dict(weighting_state)
            except (RuntimeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"The saved weighting state does not fit {self.weighting!r}: {err}"
                ) from err

        # 2. Write. The inner optimizer's own load validates before it writes (torch's do).
        self.optimizer.load_state_dict(inner)
        if weighting_state is None:
            for module in self.weighting.modules():
                if isinstance(module, Stateful):
                    module.reset()
        else:
            self.weighting.load_state_dict(weighting_state)
        self._record.skipped_steps = skipped_steps

        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- copying and pickling -------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        """``copy.deepcopy`` and ``pickle`` support.

        ``torch.optim.Optimizer`` keeps only ``defaults``, ``state`` and ``param_groups``,
        which are properties here (the inner optimizer's): the whole object is kept instead.
        As for torch optimizers, copy the model and the optimizer together
        (``copy.deepcopy((model, opt))``, one ``pickle.dumps((model, opt))``) for the copy to
        step the copied model. An engine that hooks the model's modules (layer-wise,
        multi-task) is rebuilt on the copied modules; the hooks a copied model carries from the
        original engine are inert (they record nothing).
        In a distributed run the copy resolves its own communicator on its first backward;
        a ``process_group`` given at construction is shared by ``deepcopy`` and cannot be
        pickled (as torch's process groups).
        """
        if getattr(self, "_fsdp2", None) is not None:
            raise TypeError(
                "A JDOptimizer over FSDP2 (sharded) parameters cannot be copied or pickled: it "
                "refers to the fully_shard modules' unsharded parameters. Save "
                "`opt.state_dict()` and build a new JDOptimizer."
            )
        state = self.__dict__.copy()
        if self._jd_ids is not None:
            # Partial JD names its parameters by id(), which a copy does not keep: carry the
            # tensors themselves (copied along with the inner optimizer's) and re-key them.
            state["_jd_ids"] = [
                p for group in self.param_groups for p in group["params"] if id(p) in self._jd_ids
            ]
        if state.get("_comm") is not None:
            # The distributed step's communicator (jdoptim.distributed) holds a process group,
            # which cannot be copied: the copy resolves its own on its first backward.
            state["_comm"] = None
            state["_comm_resolved"] = False
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> JDOptimizer:
        # As pickling (`__getstate__`), except that a process group given to the distributed
        # step is shared with the copy: it is a handle on the running processes, not state.
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        state = self.__getstate__()
        group = state.get("process_group")
        if group is not None:
            memo.setdefault(id(group), group)
        copied.__setstate__(copy.deepcopy(state, memo))
        return copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if state.get("_jd_ids") is not None:
            state["_jd_ids"] = frozenset(id(p) for p in state["_jd_ids"])
        # Objects pickled before the distributed step existed.
        for key, default in (("distributed", "auto"), ("process_group", None), ("_comm", None),
                             ("_comm_resolved", False), ("_fsdp2", None)):  # fmt: skip
            state.setdefault(key, default)
        self.__dict__.update(state)
        self._patch_step_function()

    def close(self) -> None:
        """Remove the hooks that the engine placed on the model (layer-wise and multi-task
        engines), and what they stored. Also done when the engine is garbage collected, e.g.
        with this optimizer; ``close()`` makes it deterministic (idempotent)."""
        remove = getattr(self.engine, "remove", None)
        if callable(remove):
            remove()

    def reset(self) -> None:
        """Reset every stateful weighting module (:class:`~jdoptim.aggregation.Stateful`) and
        the monitoring attributes; the inner optimizer's state is left alone."""
        for module in self.weighting.modules():
            if isinstance(module, Stateful):
                module.reset()
        self._record.last_weights = None
        self._record.last_gramian = None

    def __repr__(self) -> str:
        return (
            f"JDOptimizer(optimizer={type(self.optimizer).__name__}, weighting={self.weighting!r}, "
            f"engine={self.engine!r}, nonfinite={self.nonfinite!r})"
        )


_STATE_KEY = "jdoptim"
# Version of the "jdoptim" entry. jdoptim 0.1.0 used another layout (version 1, see
# `_split_state_dict`); version 2 is the inner optimizer's state dict plus `_STATE_KEY`.
_STATE_VERSION = 2


def _split_state_dict(
    state_dict: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a saved state dict into the inner optimizer's and the validated JD extras
    (``None`` for a plain inner state dict)."""
    if _STATE_KEY in state_dict:
        extras = state_dict[_STATE_KEY]
        inner = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        if not isinstance(extras, Mapping):
            raise TypeError(
                f'`state_dict["{_STATE_KEY}"]` should be a mapping. Found '
                f"`{type(extras).__name__}`."
            )
        version = extras.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f'Unknown `state_dict["{_STATE_KEY}"]["version"]` {version!r}: this jdoptim '
                f"reads version {_STATE_VERSION} (and jdoptim 0.1.0's format). Was it saved by "
                "a newer jdoptim?"
            )
    elif "optimizer" in state_dict and "state" not in state_dict:
        # jdoptim 0.1.0: {"optimizer": inner, "weighting": ..., "skipped_steps": ...}.
        inner = state_dict["optimizer"]
        extras = {k: v for k, v in state_dict.items() if k != "optimizer"}
        extras.setdefault("skipped_steps", 0)
        if not isinstance(inner, Mapping):
            raise TypeError(
                '`state_dict["optimizer"]` (jdoptim 0.1.0 format) should be a mapping. Found '
                f"`{type(inner).__name__}`."
            )
        inner = dict(inner)
    else:
        return state_dict, None
    missing = [key for key in ("weighting", "skipped_steps") if key not in extras]
    if missing:
        raise ValueError(f"The saved JD state misses the key(s) {missing}.")
    if not isinstance(extras["weighting"], Mapping):
        raise TypeError(
            "The saved weighting state should be a mapping (an nn.Module state dict). Found "
            f"`{type(extras['weighting']).__name__}`."
        )
    skipped = extras["skipped_steps"]
    if isinstance(skipped, Tensor) and skipped.numel() == 1 and not skipped.is_floating_point():
        skipped = int(skipped)  # eager-only checkpoint code: a host read is fine
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"`skipped_steps` should be a non-negative int. Found {skipped!r}.")
    return inner, {"weighting": extras["weighting"], "skipped_steps": skipped}


def _check_inner_state_dict(optimizer: torch.optim.Optimizer, inner: dict[str, Any]) -> None:
    """The checks of ``torch.optim.Optimizer.load_state_dict``, made before anything is written
    (so that a refused JD state dict changes nothing)."""
    missing = [key for key in ("state", "param_groups") if key not in inner]
    if missing:
        raise ValueError(
            f"The state dict misses the key(s) {missing}. Expected the state dict of a "
            "JDOptimizer (the inner optimizer's keys plus 'jdoptim'), of jdoptim 0.1.0 "
            "('optimizer', 'weighting', 'skipped_steps') or of a plain torch optimizer "
            "('state', 'param_groups')."
        )
    if not isinstance(inner["state"], Mapping):
        raise TypeError(f"`state` should be a mapping. Found `{type(inner['state']).__name__}`.")
    saved = inner["param_groups"]
    if not isinstance(saved, (list, tuple)) or not all(
        isinstance(group, Mapping) and "params" in group for group in saved
    ):
        raise TypeError("`param_groups` should be a list of dicts, each with a 'params' entry.")
    groups = optimizer.param_groups
    if len(saved) != len(groups):
        raise ValueError(
            f"The state dict has {len(saved)} parameter group(s); the inner optimizer has "
            f"{len(groups)}."
        )
    for i, (group, saved_group) in enumerate(zip(groups, saved, strict=True)):
        if len(group["params"]) != len(saved_group["params"]):
            raise ValueError(
                f"Parameter group {i} of the state dict has {len(saved_group['params'])} "
                f"parameter(s); the inner optimizer's has {len(group['params'])}."
            )


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    """``params`` without repeats, in order."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


_SPARSE_HINT = (
    "its sparse gradient cannot be batched into a Jacobian. Build it with sparse=False (the "
    "inner optimizer then gets a dense gradient), or leave its weight out of the Jacobian "
    "with JDOptimizer(..., params=[...]) (it then gets an ordinary gradient, sparse allowed)."
)


def _check_sparse_embeddings(model: torch.nn.Module, jd: list[Tensor]) -> None:
    """Raise for an ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` whose weight is a
    JD parameter (eager, construction time)."""
    ids = {id(p) for p in jd}
    for name, module in model.named_modules():
        sparse_type = isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
        if sparse_type and module.sparse and id(module.weight) in ids:
            where = f"Module {name!r} ({module!r})" if name else f"The model ({module!r})"
            raise ValueError(f"{where} is not supported: " + _SPARSE_HINT)


def _explain_sparse_gradients(losses: Tensor, jd: list[Tensor], error: Exception) -> None:
    """After a ``NotImplementedError`` (eager): if the losses' graph holds a sparse-gradient
    embedding of a JD parameter, raise a clear error naming it."""
    if not isinstance(losses, Tensor) or losses.grad_fn is None:
        return
    ids = {id(p) for p in jd}
    stack, seen = [losses.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "_saved_sparse", False) is True:
            weight = getattr(node.next_functions[0][0], "variable", None)
            if weight is not None and id(weight) in ids:
                kind = "nn.EmbeddingBag" if "Bag" in node.name() else "nn.Embedding"
                raise ValueError(
                    f"{kind}(sparse=True) with weight of shape {tuple(weight.shape)} is not "
                    "supported: " + _SPARSE_HINT
                ) from error
        stack.extend(next_node for next_node, _ in node.next_functions)
