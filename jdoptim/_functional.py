r"""The functional pieces of a Jacobian-descent step (what :class:`jdoptim.JDOptimizer` runs).

For losses :math:`L \in \mathbb{R}^{m_1 \times \dots \times m_k}` and the JD parameters
:math:`\theta`:

1. **Gramian engine** (:mod:`jdoptim.gramian`): :math:`G = J J^\top` with
   :math:`J = \partial\,\mathrm{vec}(L) / \partial \theta \in \mathbb{R}^{M \times n}`,
   :math:`M = \prod_i m_i`;
2. **weighting** (:mod:`jdoptim.aggregation`): :math:`w = \mathcal{W}(G)` (for a vector of
   losses) or :math:`W = \mathcal{W}(\mathcal{G})` on the generalized Gramian (losses of
   higher order), or an aggregator applied to the materialised :math:`J`;
3. **weighted gradient**: :math:`\nabla_\theta \mathrel{+}= J^\top w` accumulated into
   ``.grad``; the other parameters (partial JD) get :math:`\nabla (w^\top L)` (or
   :math:`\nabla (\mathbb{1}^\top L)`);
4. the inner optimizer's step (in :class:`jdoptim.JDOptimizer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .aggregation import Flattening
from .aggregation._base import (
    Aggregator,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from .aggregation._checks import value_checks
from .distributed import batch_slice, check_sharded_grads, to_param_layout
from .gramian import GramianEngine, accumulation_dtype, to_generalized_gramian
from .gramian._scale import exponent, gram_shift, pow2

if TYPE_CHECKING:
    from .distributed import Communicator

NonFinitePolicy = Literal["raise", "skip", "propagate"]
OtherParamsGrad = Literal["weighted", "sum"]
_POLICIES = ("raise", "skip", "propagate")
_OTHER = ("weighted", "sum")


class NonFiniteError(ValueError):
    """Raised when the losses or their Gramian hold NaN or inf (``nonfinite="raise"``)."""


class WeightingStrategy:
    """How weights are obtained from a user's ``Weighting``, ``GeneralizedWeighting`` or
    ``Aggregator`` (resolved once).

    * a Gramian-weighted aggregator (e.g. ``UPGrad()``) uses its ``gramian_weighting``;
    * a ``Weighting`` reads the ``[M, M]`` Gramian of a vector of losses, and is wrapped in
      :class:`~jdoptim.aggregation.Flattening` for losses of higher order;
    * a ``GeneralizedWeighting`` reads the generalized Gramian ``[m1..mk, mk..m1]``;
    * any other aggregator reads the materialised Jacobian ``[M, n]``; a
      ``WeightedAggregator`` (forward not overridden) yields weights, the others only an
      update (their weights are ``None``).

    >>> from jdoptim.aggregation import Mean, MeanWeighting
    >>> WeightingStrategy(MeanWeighting()).needs_jacobian, WeightingStrategy(Mean()).needs_jacobian
    (False, True)
    """

    def __init__(self, weighting: Weighting | GeneralizedWeighting | Aggregator) -> None:
        if isinstance(weighting, type):
            raise TypeError(
                f"`weighting` should be an instance, but got the class `{weighting.__name__}`: "
                f"instantiate it, e.g. `{weighting.__name__}()`."
            )
        self.source = weighting
        self.gramian_weighting: Weighting | None = None
        self.generalized: GeneralizedWeighting | None = None
        self.aggregator: Aggregator | None = None
        if isinstance(weighting, GramianWeightedAggregator):
            self.gramian_weighting = weighting.gramian_weighting
        elif isinstance(weighting, Aggregator):
            self.aggregator = weighting
        elif isinstance(weighting, GeneralizedWeighting):
            self.generalized = weighting
        elif isinstance(weighting, Weighting):
            self.gramian_weighting = weighting
        else:
            raise TypeError(
                "`weighting` should be a jdoptim.aggregation Weighting, GeneralizedWeighting or "
                f"Aggregator. Found `{type(weighting).__name__}`."
            )
        if self.gramian_weighting is not None:
            self.generalized = Flattening(self.gramian_weighting)

    @property
    def needs_jacobian(self) -> bool:
        """Whether the materialised Jacobian (not only the Gramian) is needed."""
        return self.aggregator is not None

    @property
    def has_weights(self) -> bool:
        """Whether the strategy produces weights (every one but plain Jacobian aggregators)."""
        return self.aggregator is None or self._weighted_aggregator

    @property
    def _weighted_aggregator(self) -> bool:
        agg = self.aggregator
        return isinstance(agg, WeightedAggregator) and (
            type(agg).forward is WeightedAggregator.forward
        )

    def weights_from_gramian(self, gramian: Tensor, shape: torch.Size) -> Tensor:
        """Weights of shape ``shape`` from the flat ``[M, M]`` Gramian."""
        if self.gramian_weighting is not None and len(shape) == 1:
            weights = self.gramian_weighting(gramian)
        else:
            assert self.generalized is not None
            weights = self.generalized(to_generalized_gramian(gramian, shape))
        _check_weights_shape(weights, shape)
        return weights


def _check_weights_shape(weights: Tensor, shape: torch.Size) -> None:
    if not isinstance(weights, Tensor) or weights.shape != shape:
        found = weights.shape if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"The weighting returned weights of shape {found} for losses of shape {shape}."
        )


def check_losses(losses: Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` for losses that JD cannot differentiate.

    >>> import torch
    >>> check_losses(torch.ones(2))
    Traceback (most recent call last):
    ...
    ValueError: `losses` does not require grad: ...
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"`losses` should be a Tensor. Found `{type(losses).__name__}`.")
    if losses.numel() == 0:
        raise ValueError(f"`losses` should not be empty. Found `losses.shape = {losses.shape}`.")
    if not losses.is_floating_point():
        raise ValueError(f"`losses` should be floating point. Found dtype {losses.dtype}.")
    if not losses.requires_grad:
        raise ValueError(
            "`losses` does not require grad: compute it from parameters that require grad, "
            "with grad enabled."
        )


def check_batch_dim(losses: Tensor, batch_dim: int | None) -> None:
    """Raise ``ValueError`` when ``losses`` has no dimension ``batch_dim`` (static shapes only).

    >>> import torch
    >>> check_batch_dim(torch.ones(3, 2), 1)
    >>> check_batch_dim(torch.tensor(1.0), 0)
    Traceback (most recent call last):
    ...
    ValueError: `losses` is a single (0-d) loss, but batch_dim=0 declares per-sample losses...
    """
    if batch_dim is None:
        return
    if losses.ndim == 0:
        raise ValueError(
            f"`losses` is a single (0-d) loss, but batch_dim={batch_dim} declares per-sample "
            'losses: compute the loss with reduction="none" (e.g. F.cross_entropy(logits, y, '
            'reduction="none")) so that it has one entry per sample.'
        )
    if losses.ndim <= batch_dim:
        raise ValueError(
            f"`losses` of shape {tuple(losses.shape)} has no dimension batch_dim={batch_dim}."
        )


@dataclass
class JDOutput:
    """What :func:`jd_backward` did."""

    weights: Tensor | None
    """Detached weights, shape of the losses (``None`` for a non-weighted aggregator; NaN if
    the step was skipped)."""
    gramian: Tensor | None
    """Detached ``[M, M]`` Gramian over the JD parameters."""
    skipped: bool = False
    """Eager only: the losses or Gramian were non-finite and nothing was written."""
    ok: Tensor | None = None
    """Under ``torch.compile`` with a checking policy: a 0-d bool tensor, ``False`` when the
    step was non-finite (the gradients were then left unchanged). The caller reads it later."""


def _accumulate(param: Tensor, grad: Tensor, ok: Tensor | None) -> None:
    grad = grad.detach() if grad.requires_grad else grad
    if ok is None:
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)
    elif param.grad is None:
        param.grad = torch.where(ok, grad, torch.zeros_like(grad))
    else:
        param.grad.copy_(torch.where(ok, param.grad + grad, param.grad))


def _maybe_no_value_checks(policy: NonFinitePolicy) -> contextlib.AbstractContextManager:
    if policy == "propagate" and not torch.compiler.is_compiling():
        return value_checks("never")
    return contextlib.nullcontext()


def jd_backward(
    losses: Tensor,
    params: Sequence[Tensor],
    strategy: WeightingStrategy,
    engine: GramianEngine,
    *,
    other_params: Sequence[Tensor] = (),
    other_params_grad: OtherParamsGrad = "weighted",
    nonfinite: NonFinitePolicy = "raise",
    retain_graph: bool = False,
    batch_dim: int | None = None,
    comm: Communicator | None = None,
    engine_params: Sequence[Tensor] | None = None,
) -> JDOutput:
    r"""Accumulate the Jacobian-descent gradient of ``losses`` into ``.grad`` (steps 1–3 of the
    module docstring) and return the weights.

    :param losses: any floating tensor of losses requiring grad. A 0-d loss is an ordinary
        backward (weight ``1``).
    :param params: the JD parameters (the Jacobian is taken with respect to them).
    :param strategy: the resolved weighting (:class:`WeightingStrategy`).
    :param engine: the Gramian engine.
    :param other_params: parameters that get the gradient of the weighted loss
        :math:`w^\top L` (``other_params_grad="weighted"``) or of :math:`\mathbb{1}^\top L`
        (``"sum"``) instead of taking part in the Jacobian (partial JD).
    :param nonfinite: ``"raise"`` (:class:`NonFiniteError`, nothing written), ``"skip"`` (nothing
        written, ``skipped=True``) or ``"propagate"`` (no check, no host sync: NaN/inf flow into
        the gradients, e.g. for ``GradScaler``). Eagerly the check is one device-to-host read;
        under ``torch.compile`` it is not read here: the gradients are written masked and the
        flag is returned in ``ok``.
    :param retain_graph: keep the graph of ``losses`` after the call.
    :param batch_dim: the dimension of ``losses`` that indexes samples, when the losses are
        per-sample (``None``: they are not declared so). ``losses`` must have that dimension:
        a 0-d loss (a mean, i.e. a forgotten ``reduction="none"``) raises ``ValueError``. An
        engine with :attr:`~jdoptim.gramian.GramianEngine.shaped_losses` gets ``losses`` as
        they are and ``batch_dim``, any other engine the flat vector.
    :param comm: distributed step (:mod:`jdoptim.distributed`): ``None`` (single process),
        or a communicator in ``"global"`` or ``"local"`` mode. In the global mode
        ``batch_dim`` also says how the ranks' losses concatenate (``None``: batch means).
    :param engine_params: the tensors the engine differentiates in place of ``params`` (FSDP2:
        the unsharded parameters of the sharded ``params``); ``None``: ``params``.

    >>> import torch
    >>> from jdoptim.aggregation import UPGradWeighting
    >>> from jdoptim.gramian import JacobianEngine
    >>> x = torch.tensor([1.0, -1.0], requires_grad=True)
    >>> losses = torch.stack([x[0] - x[1], x[1] - x[0] + x[0]])  # J = [[1, -1], [0, 1]]
    >>> out = jd_backward(losses, [x], WeightingStrategy(UPGradWeighting()), JacobianEngine())
    >>> bool(((out.gramian.to(x.dtype) @ out.weights) >= -1e-6).all())  # no conflict
    True
    """
    check_losses(losses)
    if nonfinite not in _POLICIES:
        raise ValueError(f"`nonfinite` should be one of {_POLICIES}, but got {nonfinite!r}.")
    if other_params_grad not in _OTHER:
        raise ValueError(
            f"`other_params_grad` should be one of {_OTHER}, but got {other_params_grad!r}."
        )
    check_batch_dim(losses, batch_dim)
    params = list(params)
    other_params = list(other_params)
    if not params and not other_params:
        raise ValueError("There is no parameter requiring grad to differentiate the losses for.")
    compiling = torch.compiler.is_compiling()
    check = nonfinite != "propagate"
    # Under torch.compile the losses may outlive this graph (e.g. held by a caller's frame across
    # the inner optimizer's graph break); Dynamo then requires the traced autograd calls to
    # retain their graph. Inside one graph this costs nothing.
    retain_graph = retain_graph or compiling

    if losses.ndim == 0:
        return _scalar_backward(losses, params + other_params, check, nonfinite, retain_graph, comm)

    if not params:
        raise ValueError("Jacobian descent needs at least one JD parameter requiring grad.")
    flat = losses.reshape(-1)
    keep = retain_graph or bool(other_params)
    differentiated = params if engine_params is None else list(engine_params)
    if engine.shaped_losses:  # the losses as they are, and which dimension is the batch
        extra = {} if batch_dim is None else {"batch_dim": batch_dim}
        result = engine.compute(losses, differentiated, retain_graph=keep, **extra)
    else:
        result = engine.compute(flat, differentiated, retain_graph=keep)
    glob = comm is not None and comm.mode == "global"
    shape = losses.shape
    sizes: list[int] | None = None
    seen = losses.detach()
    if glob:
        assert comm is not None
        if result.batch_dim is not None:
            batch_dim = result.batch_dim
        sizes = comm.loss_shapes(losses, batch_dim)
        sharded = engine_params is not None and batch_dim is None
        if sharded and strategy.aggregator is None and hasattr(result, "to_shards"):
            # FSDP2, batch-mean losses, a Gramian weighting: each rank keeps its shard of J.
            result, seen = result.to_shards(comm, losses, params)
        else:
            result, seen = result.to_global(comm, losses, batch_dim, sizes)
        shape = seen.shape
    gramian = result.gramian.detach()

    ok: Tensor | None = None
    if check:
        flag = torch.isfinite(gramian).all() & torch.isfinite(seen).all()
        if comm is not None and not glob:
            flag = comm.all_true(flag)  # local mode: every rank raises or skips together
        if compiling:
            ok = flag
        elif not bool(flag):  # the one host read of the step (documented)
            if nonfinite == "raise":
                raise NonFiniteError(
                    "The losses or their Gramian hold NaN or inf; no gradient was written. Use "
                    "nonfinite='skip' to skip such steps."
                )
            nan = torch.full(shape, float("nan"), dtype=gramian.dtype, device=flat.device)
            return JDOutput(weights=nan, gramian=gramian, skipped=True)

    weights: Tensor | None
    with torch.no_grad(), _maybe_no_value_checks(nonfinite):
        if strategy.aggregator is None:
            weights = strategy.weights_from_gramian(gramian, shape)
            if glob:  # rank 0's weights everywhere: the ranks cannot drift
                weights = comm.broadcast(weights)  # type: ignore[union-attr]
            grads = result.weighted_gradient(weights.reshape(-1))
        elif strategy.has_weights:
            agg = strategy.aggregator
            assert isinstance(agg, WeightedAggregator)
            weights = agg.weighting(result.jacobian())
            _check_weights_shape(weights, torch.Size([shape.numel()]))
            weights = weights.reshape(shape)
            if glob:
                weights = comm.broadcast(weights)  # type: ignore[union-attr]
            grads = result.weighted_gradient(weights.reshape(-1))
        else:
            weights = None
            update = strategy.aggregator(result.jacobian())
            if glob:
                update = comm.broadcast(update)  # type: ignore[union-attr]
            grads = result.split(update)

    other_grads: Sequence[Tensor | None] = []
    if other_params:
        if other_params_grad == "weighted":
            if weights is None:
                raise ValueError(
                    f"{strategy.source!r} produces no weights; use other_params_grad='sum' with it."
                )
            w_local = weights
            if glob and batch_dim is not None:
                assert comm is not None and sizes is not None
                w_local = batch_slice(weights, batch_dim, sizes, comm.rank)
            grad_outputs = w_local.reshape(-1).to(flat.dtype)
        else:
            grad_outputs = torch.ones_like(flat)
        other_grads = torch.autograd.grad(
            flat, other_params, grad_outputs, retain_graph=retain_graph, allow_unused=True
        )
        if glob:  # the other parameters' gradient of the global weighted loss
            op = "avg" if batch_dim is None else "sum"
            other_grads = _reduce_grads(comm, other_params, other_grads, op)  # type: ignore[arg-type]
    if comm is not None and engine_params is None:  # FSDP2 + layer-wise engine
        check_sharded_grads(params, grads)
    if comm is not None and not glob:  # local mode: average the JD gradients, as DDP
        everything = _reduce_grads(comm, params + other_params, [*grads, *other_grads], "avg")
        grads, other_grads = everything[: len(params)], everything[len(params) :]

    for p, g in zip(params + other_params, list(grads) + list(other_grads), strict=True):
        if g is not None:
            if comm is not None:  # sharded parameters (FSDP2): this rank's shard
                g = to_param_layout(p, g)
            _accumulate(p, g, ok)
    detached = None if weights is None else weights.detach()
    return JDOutput(weights=detached, gramian=gramian, ok=ok)


def _reduce_grads(
    comm: Communicator, params: Sequence[Tensor], grads: Sequence[Tensor | None], op: str
) -> list[Tensor | None]:
    """Sum or average gradients over ranks in one bucket (``None``: zeros, as DDP does for
    a parameter that no loss reaches on some rank)."""
    full = [
        torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None else g  # full size
        for p, g in zip(params, grads, strict=True)
    ]
    if not full:
        return []
    return list(comm.reduce(full, op))  # type: ignore[arg-type]


def _scalar_backward(
    loss: Tensor,
    params: list[Tensor],
    check: bool,
    nonfinite: NonFinitePolicy,
    retain_graph: bool,
    comm: Communicator | None = None,
) -> JDOutput:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    if comm is not None:  # one loss: the mean over ranks is DDP's step in every mode
        grads = tuple(_reduce_grads(comm, params, grads, "avg"))
        loss = comm.reduce([loss.detach()], "avg")[0]
    found = [g.detach() for g in grads if g is not None]
    dtype = accumulation_dtype(*(g.dtype for g in found))
    # |2^-s g|^2 (s = 0 unless the gradient is huge or tiny, see jdoptim.gramian._scale).
    shift = gram_shift([exponent(g) for g in found], dtype, loss.device)
    scale = pow2(-shift, dtype)
    sq = [(g.to(dtype) * scale).square().sum() for g in found]
    gramian = torch.stack(sq).sum().reshape(1, 1) if sq else loss.new_zeros(1, 1).float()
    ok: Tensor | None = None
    if check:
        flag = torch.isfinite(gramian).all() & torch.isfinite(loss.detach())
        if torch.compiler.is_compiling():
            ok = flag
        elif not bool(flag):
            if nonfinite == "raise":
                raise NonFiniteError(
                    "The loss or its gradient holds NaN or inf; no gradient was written."
                )
            nan = torch.full((), float("nan"), dtype=gramian.dtype, device=loss.device)
            return JDOutput(weights=nan, gramian=gramian, skipped=True)
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            _accumulate(p, g, ok)
    ones = torch.ones((), dtype=gramian.dtype, device=loss.device)
    return JDOutput(weights=ones, gramian=gramian, ok=ok)
