r"""The multi-task engine: a shared trunk, one head per task, and the structure kept.

In multi-task learning a *trunk* with parameters :math:`\theta_s` maps the batch to features
:math:`z`, *head* :math:`k` (parameters :math:`\theta_k`) maps :math:`z` to the outputs
:math:`y_k` of task :math:`k`, and the loss :math:`L_k` depends on the model through
:math:`y_k` only. The Jacobian then has a dense trunk block and a block-diagonal head block,

.. math::
    J = \begin{bmatrix} \partial L / \partial \theta_s & \operatorname{diag}_k
        (\nabla_{\theta_k} L_k) \end{bmatrix},
    \qquad
    G = J_s J_s^\top + \operatorname{diag}_k \lVert \nabla_{\theta_k} L_k \rVert^2,
    \qquad
    J_s = \begin{bmatrix} \delta_1^\top \\ \vdots \\ \delta_m^\top \end{bmatrix}
        \frac{\partial z}{\partial \theta_s},

where :math:`\delta_k = \partial L_k / \partial z`. The engine uses that structure:

1. :math:`c_k = \partial L_k / \partial y_k` for every task, from one backward of the losses
   batched over the ``m`` rows of the identity that stops at the heads' outputs (it only goes
   through the loss functions, which are cheap);
2. every :math:`\delta_k` and every head gradient :math:`\nabla_{\theta_k} L_k` from **one
   ordinary backward** through the heads with cotangents :math:`c_k`: each head is handed its
   own alias of :math:`z` (a forward pre-hook), so the heads' contributions do not mix. Going
   through ``m`` heads with ``m`` batched rows instead would cost ``m`` times more and, for
   small heads, is memory-bound on summing ``m`` dense ``[m, *z.shape]`` gradients;
3. one backward through the trunk batched over the ``m`` cotangents :math:`\delta_k`, stopping
   at the outputs of the trunk's ``nn.Linear`` layers. For such a layer with input rows
   :math:`a_t` (every position of the batch: ``t`` runs over all its leading dimensions) and
   output gradients :math:`\delta_{kt}`, the trunk Gramian is formed layer-wise,

   .. math:: G^{(W)}_{kl} = \sum_{t,s} (a_t \cdot a_s + [\text{bias}])\,
       (\delta_{kt} \cdot \delta_{ls}),

   kernel-first (:math:`T^2 d + T^2 m p + m^2 T p` multiply-adds for ``T`` positions, input
   size ``d`` and output size ``p``) or from the materialised per-task gradients
   :math:`\sum_t \delta_{kt} a_t^\top` (:math:`mTpd + m^2 pd`), whichever is cheaper (the rule
   of :class:`~jdoptim.gramian.LayerwiseGramianEngine`). The trunk's other parameters get exact
   per-task gradients from the same batched backward.

The weighted gradient is read off the same tensors, with no second backward:
:math:`(\sum_k w_k \delta_{kt})^\top a_t` summed over positions for a trunk ``Linear``, and
:math:`w_k \nabla_{\theta_k} L_k` for head :math:`k`. Parameters that are neither in the trunk
nor in a head get exact per-task gradients from a batched backward of the losses.

**Structure, and what is checked.** ``heads[k]`` must produce the outputs of loss ``k`` alone,
be called once in the forward pass of the losses (checked; calls of earlier forward passes
that the losses do not reach are ignored), and share no parameter with another head or the
trunk (checked at construction). On CPU tensors outside ``torch.compile`` (the value checks of
:func:`jdoptim.aggregation.set_value_checks`), a loss that depends on another task's head
raises ``ValueError``. The losses must depend on the trunk only through the heads (a loss
that reads :math:`z`, or a trunk activation, directly is not seen); use the
:class:`~jdoptim.gramian.JacobianEngine` for other layouts.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..aggregation._checks import should_check_values
from ._base import GramianEngine, GramianResult
from ._global import reduce_mean
from ._graph import graph_visible, input_node, leaf_users, local_nodes, outside_of, reachable
from ._hooks import EngineHook
from ._kernels import accumulation_dtype
from ._layers import (
    Dims,
    Factor,
    LinearRule,
    PerSample,
    exact_call,
    factor_exponents,
    rule_for,
)
from ._scale import gram_shift, pow2
from ._vjp import chunked_batched_grad
from .layerwise import Strategy, prepare_factors, rebuild_engine, remove_handles

if TYPE_CHECKING:
    from ..distributed import Communicator

_STRATEGIES = ("auto", "ghost", "materialize")


class _HeadCall:
    """One call of a head: its input (in the trunk's graph), the alias the head saw, and its
    output."""

    def __init__(self, source: Tensor, alias: Tensor) -> None:
        self.source, self.alias = source, alias
        self.output: Tensor | None = None


class _TrunkCall:
    """One call of a trunk ``nn.Linear``: its input (detached) and its output (in the graph);
    ``exact`` is false when the Linear rule cannot differentiate it (``exact_call``)."""

    def __init__(
        self, module: nn.Module, saved: Tensor, output: Tensor, stop: object, exact: bool = True
    ) -> None:
        self.module, self.saved, self.output, self.stop = module, saved, output, stop
        self.exact = exact


class MultiTaskResult(GramianResult):
    """The Gramian of one call of the multi-task engine, and its weighted gradients."""

    def __init__(
        self,
        gramian: Tensor,
        params: Sequence[Tensor],
        factors: list[Factor],
        head_grads: dict[int, tuple[int, Tensor]],
        m: int,
        dtype: torch.dtype,
    ) -> None:
        self.gramian = gramian
        self.params = list(params)
        self._factors = factors
        self._head_grads = head_grads
        self._m = m
        self._dtype = dtype

    def to_global(
        self,
        comm: Communicator,
        losses: Tensor,
        batch_dim: int | None,
        sizes: list[int] | None,
    ) -> tuple[MultiTaskResult, Tensor]:
        r"""Batch-mean task losses: :math:`J = \frac1R \sum_r J_r`. Each trunk ``nn.Linear``
        all-gathers its positions (``T (d + m p)`` numbers) or all-reduces its ``[m, p (d+1)]``
        per-task gradient, whichever sends fewer bytes; head gradients and other materialised
        gradients are averaged (all-reduce)."""
        if batch_dim is not None:
            raise ValueError(
                "The multi-task engine's losses are one batch-mean loss per task: do not pass "
                "batch_dim."
            )
        m = self._m
        keys = list(self._head_grads)
        extra = [losses.detach(), *(self._head_grads[i][1] for i in keys)]
        factors, reduced = reduce_mean(self._factors, extra, Dims(B=1, K=m, batch_dim=0), comm)
        head_grads = {
            i: (self._head_grads[i][0], g) for i, g in zip(keys, reduced[1:], strict=True)
        }
        device = self.gramian.device
        result = _assemble(factors, self.params, head_grads, m, self._dtype, device)
        return result, reduced[0]

    def weighted_gradient(self, weights: Tensor) -> list[Tensor | None]:
        r"""Return :math:`\sum_k w_k \nabla_{\theta_p} L_k` for each parameter (``None`` where no
        loss reaches it); ``weights`` is ``[m]``."""
        if weights.numel() != self._m:
            raise ValueError(
                f"Expected {self._m} weights (one per task), got shape {tuple(weights.shape)}."
            )
        w = weights.detach().reshape(1, self._m).to(self._dtype)
        sums: dict[int, Tensor] = {}
        for factor in self._factors:
            for i, g in factor.weighted(w).items():
                sums[i] = g if i not in sums else sums[i] + g
        for i, (k, g) in self._head_grads.items():
            sums[i] = w[0, k] * g.to(self._dtype)
        out: list[Tensor | None] = []
        for i, p in enumerate(self.params):
            out.append(None if i not in sums else sums[i].reshape(p.shape).to(p.dtype))
        return out


class MultiTaskGramianEngine(GramianEngine):
    r"""Gramian of ``m`` task losses for a shared trunk and one head per task.

    See the module docstring for the math and the structure it relies on. Construct it once on
    the model's trunk and heads (it registers hooks); then, for each batch, run the forward
    pass and call :meth:`compute` with the ``m`` losses, loss ``k`` being task ``k``'s (the
    order of ``heads``). With :class:`~jdoptim.JDOptimizer`, pass it as ``engine=``.

    :param trunk: the shared module(s): one module or a sequence of them.
    :param heads: the task heads, in the order of the losses.
    :param strategy: for the trunk's ``nn.Linear`` weights: ``"auto"`` (cheaper route),
        ``"ghost"`` or ``"materialize"``.
    :param chunk_size: tasks per backward pass through the trunk. ``None`` (default) runs all
        ``m`` in one batched pass; ``c`` bounds the memory of that pass to ``c`` copies of the
        trunk's intermediate gradients, at the cost of ``ceil(m / c)`` passes (``1``: plain
        backward passes, no ``vmap``). The Gramian and the update do not change.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    >>> engine = MultiTaskGramianEngine(trunk, heads)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 3)
    >>> z = trunk(x)
    >>> losses = torch.stack([((head(z)[:, 0] - y[:, k]) ** 2).mean()
    ...                       for k, head in enumerate(heads)])
    >>> params = [*trunk.parameters(), *heads.parameters()]
    >>> result = engine.compute(losses, params, retain_graph=True)
    >>> # Same as the Gramian of the full Jacobian:
    >>> rows = [torch.cat([g.flatten() for g in torch.autograd.grad(l, params, retain_graph=True)])
    ...         for l in losses]
    >>> J = torch.stack(rows)
    >>> torch.allclose(result.gramian, J @ J.T, atol=1e-5)
    True
    >>> w = torch.tensor([0.5, 0.2, 0.3])
    >>> torch.allclose(torch.cat([g.flatten() for g in result.weighted_gradient(w)]), w @ J,
    ...                atol=1e-6)
    True
    >>> engine.remove()
    """

    name = "multitask"
    materializes_jacobian = False

    def __init__(
        self,
        trunk: nn.Module | Sequence[nn.Module],
        heads: Sequence[nn.Module],
        *,
        strategy: Strategy = "auto",
        chunk_size: int | None = None,
    ) -> None:
        trunks = [trunk] if isinstance(trunk, nn.Module) else list(trunk)
        heads = list(heads)
        if not trunks or not all(isinstance(t, nn.Module) for t in trunks):
            raise ValueError("`trunk` should be a module or a non-empty sequence of modules.")
        if not heads or not all(isinstance(h, nn.Module) for h in heads):
            raise ValueError("`heads` should be a non-empty sequence of modules (one per task).")
        if strategy not in _STRATEGIES:
            raise ValueError(f"`strategy` should be one of {_STRATEGIES}, but got {strategy!r}.")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"`chunk_size` should be None or an int >= 1, but got {chunk_size!r}.")
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.n_tasks = len(heads)
        self._trunks = trunks
        self._heads = heads
        self._head_of: dict[int, int] = {}
        for k, head in enumerate(heads):
            for p in head.parameters():
                if self._head_of.get(id(p), k) != k:
                    raise ValueError(
                        f"Heads {self._head_of[id(p)]} and {k} share a parameter: each head must "
                        "belong to one task (use the Jacobian engine for shared heads)."
                    )
                self._head_of[id(p)] = k
        self._trunk_params: set[int] = set()
        for t in trunks:
            for p in t.parameters():
                if id(p) in self._head_of:
                    raise ValueError(
                        f"A parameter is both in the trunk and in head {self._head_of[id(p)]}."
                    )
                self._trunk_params.add(id(p))
        # `id` of the parameters found used outside their part (head, trunk, trunk Linear call)
        # at the last eager compute (see _graph), also applied under torch.compile.
        self._escaped_ids: frozenset[int] = frozenset()
        self._outside_ids: frozenset[int] = frozenset()
        self._handles: list[RemovableHandle] = []
        self._head_calls: list[list[_HeadCall]] = [[] for _ in heads]
        self._trunk_calls: list[_TrunkCall] = []
        for k, head in enumerate(heads):
            self._handles.append(head.register_forward_pre_hook(self._make_pre_hook(k)))
            self._handles.append(head.register_forward_hook(self._make_head_hook(k)))
        seen: set[int] = set()
        for t in trunks:
            for module in t.modules():
                if id(module) in seen or not isinstance(rule_for(module), LinearRule):
                    continue
                seen.add(id(module))
                hook = self._make_trunk_hook(type(module), dict(module._parameters))
                self._handles.append(module.register_forward_hook(hook))
        # The hooks hold the engine only weakly (the model must not keep it alive); once it is
        # gone, this finalizer unhooks the model.
        weakref.finalize(self, remove_handles, self._handles)

    # ------------------------------------------------------------------------------ hooks

    def _make_pre_hook(self, k: int) -> EngineHook:
        return EngineHook(self, MultiTaskGramianEngine._head_pre_hook, k, passive=False)

    def _make_head_hook(self, k: int) -> EngineHook:
        return EngineHook(self, MultiTaskGramianEngine._head_hook, k)

    def _make_trunk_hook(self, cls: type, params: dict[str, object]) -> EngineHook:
        hook = EngineHook(self, MultiTaskGramianEngine._trunk_hook, cls, params)
        hook.bound = (cls, params, hook)  # exact_call looks the hook itself up
        return hook

    def _head_pre_hook(self, k: int, module: nn.Module, args: tuple) -> tuple | None:
        """Give head ``k`` its own alias of the features, so the heads' gradients stay apart."""
        if not torch.is_grad_enabled():
            return None
        if not args or not isinstance(args[0], Tensor):
            return None
        source = args[0]
        if not source.requires_grad:
            return None
        alias = source.view_as(source)
        self._head_calls[k].append(_HeadCall(source, alias))
        return (alias, *args[1:])

    def _head_hook(self, k: int, module: nn.Module, args: tuple, output: object) -> None:
        calls = self._head_calls[k]
        if calls and calls[-1].output is None and isinstance(output, Tensor):
            calls[-1].output = output

    def _trunk_hook(
        self, cls: type, params: dict[str, object], hook: EngineHook,
        module: nn.Module, args: tuple, output: object,
    ) -> None:  # fmt: skip
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return
        exact = exact_call(module, cls, params, hook)
        call = _TrunkCall(module, args[0].detach(), output, input_node(args), exact)
        self._trunk_calls.append(call)

    def remove(self) -> None:
        """Remove the hooks and drop whatever they stored (also done when the engine is garbage
        collected)."""
        remove_handles(self._handles)
        self.reset()

    def __reduce__(self) -> tuple:
        """``copy.deepcopy`` and ``pickle``: a new engine on the (copied) trunk and heads,
        hooked anew (what a copied model carries of this engine's hooks is inert)."""
        kwargs = {"strategy": self.strategy, "chunk_size": self.chunk_size}
        return (rebuild_engine, (type(self), (self._trunks, self._heads), kwargs))

    def reset(self) -> None:
        """Drop the calls stored since the last :meth:`compute`."""
        self._head_calls = [[] for _ in self._heads]
        self._trunk_calls = []

    # ------------------------------------------------------------------------------ compute

    def compute(
        self, losses: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
    ) -> MultiTaskResult:
        """The ``[m, m]`` Gramian of the ``m`` task losses with respect to ``params``, from the
        forward pass stored since the last :meth:`compute` (whose records are dropped)."""
        head_calls, trunk_calls = self._head_calls, self._trunk_calls
        self.reset()
        m = self.n_tasks
        if losses.shape != (m,):
            raise ValueError(
                f"Expected one loss per head, i.e. shape ({m},), got {tuple(losses.shape)}."
            )
        params = list(params)
        index = {id(p): i for i, p in enumerate(params)}
        keep = retain_graph or torch.compiler.is_compiling()

        # 1. c_k = dL_k / dy_k: a batched backward through the loss functions only. Calls that
        # the losses do not reach (an earlier forward pass) come back as None and are dropped.
        calls = [(k, c) for k, cs in enumerate(head_calls) for c in cs if c.output is not None]
        if not calls:
            raise ValueError(
                "No head was called since the last compute: run the forward pass (with grad "
                "enabled) that produces the losses first."
            )
        eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
        per_call = torch.autograd.grad(
            losses, [c.output for _, c in calls], grad_outputs=eye, retain_graph=True,
            allow_unused=True, is_grads_batched=True,
        )  # fmt: skip
        reached: list[list[tuple[_HeadCall, Tensor]]] = [[] for _ in range(m)]
        for (k, c), g in zip(calls, per_call, strict=True):
            if g is not None:
                reached[k].append((c, g))
        for k, rs in enumerate(reached):
            if len(rs) > 1:
                raise ValueError(
                    f"Head {k} is called {len(rs)} times in the forward pass of the losses; each "
                    "head should be called once (use the Jacobian engine otherwise)."
                )
        heads = [rs[0][0] if rs else None for rs in reached]
        per_row = [rs[0][1] if rs else None for rs in reached]
        if should_check_values(losses):
            self._check_one_loss_per_head(per_row)

        # Parameters that the losses use outside the structure (a head reading a trunk weight,
        # a head's weight read elsewhere) take the exact fallback below. Eager only (_graph).
        roots, members = _roots(heads, per_row)
        users = None
        if graph_visible():  # else: the verdict of the last eager compute
            users, escaped = self._escaped(losses, params, heads, roots)
            self._escaped_ids = frozenset(escaped)
        known = (self._head_of.keys() | self._trunk_params) - self._escaped_ids

        # 2. One ordinary backward through the heads: every delta_k and head gradient.
        used = [k for k in range(m) if heads[k] is not None]
        head_params = [p for p in params if id(p) in self._head_of and id(p) in known]
        outputs = [heads[k].output for k in used]  # type: ignore[union-attr]
        cotangents = [per_row[k][k] for k in used]  # type: ignore[index]
        inputs = [heads[k].alias for k in used] + head_params  # type: ignore[union-attr]
        if not used:
            raise ValueError(
                "No loss depends on a head's output: the losses should come from the heads' "
                "outputs of the last forward pass."
            )
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=cotangents, retain_graph=True, allow_unused=True
        )
        deltas: list[Tensor | None] = [None] * m
        for k, g in zip(used, grads[: len(used)], strict=True):
            deltas[k] = g
        grads = grads[len(used) :]
        head_grads: dict[int, tuple[int, Tensor]] = {}
        for p, g in zip(head_params, grads, strict=True):
            if g is not None:
                head_grads[index[id(p)]] = (self._head_of[id(p)], g)

        # Parameters outside the trunk and the heads: exact per-task gradients.
        dtype = accumulation_dtype(losses.dtype, *(d.dtype for d in deltas if d is not None))
        pool = PerSample({})
        others = [p for p in params if id(p) not in known]
        if others:
            jac = torch.autograd.grad(
                losses, others, grad_outputs=eye, retain_graph=True, allow_unused=True,
                is_grads_batched=True,
            )  # fmt: skip
            for p, J in zip(others, jac, strict=True):
                if J is not None:
                    pool.add({index[id(p)]: J.reshape(1, m, -1).to(dtype)})

        # 3. One backward through the trunk, batched over the m cotangents delta_k.
        trunk_params = [p for p in params if id(p) in self._trunk_params and id(p) in known]
        factors = self._trunk_factors(
            roots, members, deltas, trunk_calls, trunk_params, index, users, pool, dtype, keep
        )
        prepared = prepare_factors(factors, pool, self.strategy)
        return _assemble(prepared, params, head_grads, m, dtype, losses.device)

    def _escaped(
        self,
        losses: Tensor,
        params: list[Tensor],
        heads: list[_HeadCall | None],
        roots: list[Tensor],
    ) -> tuple[dict[int, set], set[int]]:
        """The users of the trunk and head parameters in the graph of the losses, and the ``id``
        of those used outside their part: a head's parameter outside that head's call, a trunk
        parameter outside the graph of the heads' inputs."""
        mine = [p for p in params if id(p) in self._head_of or id(p) in self._trunk_params]
        users = leaf_users([losses], mine)
        regions: list[tuple[set, list[Tensor]]] = []
        for k, h in enumerate(heads):
            own = [p for p in mine if self._head_of.get(id(p)) == k]
            nodes = (
                set() if h is None or h.output is None else local_nodes(h.output, h.alias.grad_fn)
            )
            regions.append((nodes, own))
        regions.append((reachable(roots), [p for p in mine if id(p) in self._trunk_params]))
        return users, outside_of(users, regions)

    def _trunk_factors(
        self,
        roots: list[Tensor],
        members: list[list[int]],
        deltas: list[Tensor | None],
        trunk_calls: list[_TrunkCall],
        trunk_params: list[Tensor],
        index: dict[int, int],
        users: dict[int, set] | None,
        pool: PerSample,
        dtype: torch.dtype,
        keep: bool,
    ) -> list[Factor]:
        m = len(deltas)
        if not trunk_params:
            return []
        mine = {id(p) for p in trunk_params}
        # Trunk Linear weights with a recorded call are covered layer-wise (calls made without
        # grad do not reach the losses), unless a call is not exact or the losses use them
        # outside the recorded calls.
        covered: set[int] = set()
        inexact: set[int] = set()
        calls: list[tuple[_TrunkCall, dict[str, int]]] = []
        for call in trunk_calls:
            pidx = {
                name: index[id(p)]
                for name, p in call.module.named_parameters(recurse=False)
                if id(p) in mine
            }
            if not call.exact:
                inexact.update(pidx.values())
            elif pidx:
                calls.append((call, pidx))
                covered.update(pidx.values())
        covered -= inexact
        by_index = {index[id(p)]: p for p in trunk_params}
        if covered and users is not None:
            regions = [
                (local_nodes(c.output, c.stop), [by_index[i] for i in pidx.values()])
                for c, pidx in calls
            ]
            outside = outside_of(users, regions)
            self._outside_ids = frozenset(outside & {id(p) for p in trunk_params})
        covered -= {i for i in covered if id(by_index[i]) in self._outside_ids}
        calls = [(c, pidx) for c, pidx in calls if any(i in covered for i in pidx.values())]
        fallback = [p for p in trunk_params if index[id(p)] not in covered]

        root_cotangents = [
            torch.stack([
                d if k in ks and d is not None else torch.zeros_like(r)
                for k, d in enumerate(deltas)
            ])
            for r, ks in zip(roots, members, strict=True)
        ]  # fmt: skip
        targets = [c.output for c, _ in calls] + fallback
        if not roots or not targets:
            return []
        grads = chunked_batched_grad(
            roots, targets, root_cotangents, self.chunk_size, retain_graph=keep
        )
        dims = Dims(B=1, K=m, batch_dim=0)
        rule = LinearRule()
        factors: list[Factor] = []
        for (call, pidx), D in zip(calls, grads[: len(calls)], strict=True):
            if D is not None:
                factors += rule.factors(
                    call.module, pidx, call.saved.unsqueeze(0), D.unsqueeze(0).to(dtype), dims,
                    lambda i: i in covered,
                )  # fmt: skip
        for p, J in zip(fallback, grads[len(calls) :], strict=True):
            if J is not None:
                pool.add({index[id(p)]: J.reshape(1, m, -1).to(dtype)})
        return factors

    @staticmethod
    def _check_one_loss_per_head(per_row: Sequence[Tensor | None]) -> None:
        for k, g in enumerate(per_row):
            if g is None:
                continue
            others = torch.cat([g[:k], g[k + 1 :]])
            if bool(others.ne(0).any()):
                row = int(others.ne(0).flatten(1).any(1).nonzero()[0])
                loss = row if row < k else row + 1
                raise ValueError(
                    f"Loss {loss} depends on the output of head {k}: each head must feed its "
                    "own loss only (use the Jacobian engine for other layouts)."
                )

    def __repr__(self) -> str:
        return (
            f"MultiTaskGramianEngine(n_tasks={self.n_tasks}, strategy={self.strategy!r}, "
            f"chunk_size={self.chunk_size})"
        )


def _roots(
    heads: list[_HeadCall | None], per_row: list[Tensor | None]
) -> tuple[list[Tensor], list[list[int]]]:
    """The heads' inputs (usually one tensor ``z``) and, for each, the tasks that read it."""
    roots: list[Tensor] = []
    members: list[list[int]] = []
    for k, h in enumerate(heads):
        if h is None or per_row[k] is None:
            continue
        for j, r in enumerate(roots):
            if r is h.source:
                members[j].append(k)
                break
        else:
            roots.append(h.source)
            members.append([k])
    return roots, members


def _assemble(
    prepared: list[Factor],
    params: list[Tensor],
    head_grads: dict[int, tuple[int, Tensor]],
    m: int,
    dtype: torch.dtype,
    device: torch.device,
) -> MultiTaskResult:
    """The result from the trunk's factors and the head gradients: the Gramian of the
    gradients scaled by ``2**-shift`` (``shift = 0`` unless they are huge or tiny: it cannot
    overflow; the head blocks count in the shift too)."""
    dims = Dims(B=1, K=m, batch_dim=0)
    heads_only = PerSample({i: g.reshape(1, 1, -1) for i, (_, g) in head_grads.items()})
    shift = gram_shift(factor_exponents([*prepared, heads_only]), dtype, device)
    gramian = torch.zeros(m, m, dtype=dtype, device=device)
    for f in prepared:
        g = f.gram(dims, shift)
        if g is not None:
            gramian = gramian + g.reshape(m, m)
    if head_grads:
        scale = pow2(-shift, dtype)
        eye = torch.eye(m, dtype=dtype, device=device)
        sq = torch.zeros(m, dtype=dtype, device=device)
        for k, g in head_grads.values():
            sq = sq + eye[k] * (g.to(dtype) * scale).pow(2).sum()
        gramian = gramian + torch.diag(sq)
    result = MultiTaskResult(gramian.detach(), params, prepared, head_grads, m, dtype)
    result.gramian_exponent = 2 * shift
    return result


__all__ = ["MultiTaskGramianEngine", "MultiTaskResult"]
