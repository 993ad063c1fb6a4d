r"""Distributed Jacobian descent: the one place that talks to ``torch.distributed``.

Modes (``JDOptimizer(..., distributed=...)``):

* ``"auto"`` (default): ``"global"`` when ``torch.distributed`` is initialised and the process
  group (``process_group=``, default: the world) has more than one rank; ``"off"`` otherwise.
* ``"global"``: the step is Jacobian descent on the objectives of the **global** batch, the
  same step as one process running on the concatenation of every rank's batch:

  - batch-mean losses (no ``batch_dim``, the same shape on every rank): objective ``k`` is the
    mean over ranks of the local :math:`L_k` (DDP's convention), so
    :math:`J = \frac1R \sum_r J_r` and :math:`G = J J^\top` with the cross-rank terms;
  - per-sample losses (``batch_dim``): the objectives are the samples of all ranks,
    concatenated along ``batch_dim`` in rank order.

  Every rank computes the same global Gramian from the same communicated data, takes rank 0's
  weights (one broadcast of ``M`` numbers) and writes the same gradient, so parameters and
  optimizer state stay bitwise identical.
* ``"local"``: each rank runs JD on its own objectives and the resulting gradients are
  averaged over ranks, as DDP averages ordinary gradients. Cheaper (one all-reduce of the
  gradient, like DDP) but a different algorithm: the weights see only the local Gramian.
* ``"off"``: no communication at all (e.g. each rank trains its own model).

The engines never call ``torch.distributed`` themselves: they receive a :class:`Communicator`
and use its three verbs, :meth:`~Communicator.gather` (factors or Jacobian rows, concatenated
along a dimension), :meth:`~Communicator.reduce` (a Gramian's ingredients or a gradient,
summed or averaged) and :meth:`~Communicator.broadcast` (the weights). Every collective is a
``torch.distributed`` functional collective (``torch.distributed._functional_collectives``),
so that under ``torch.compile`` the collectives stay in the graph. Several tensors are sent in
one bucket per call (flattened and concatenated per dtype).

When ``torch.distributed`` is not initialised nothing here runs: the optimizer resolves the
mode once, finds ``"off"`` and passes ``None`` down the pipeline.

>>> resolve_mode("auto") is None  # torch.distributed not initialised: single process
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

DistributedMode = Literal["auto", "global", "local", "off"]
_MODES = ("auto", "global", "local", "off")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_mode(mode: str, group: object | None = None) -> Communicator | None:
    """The :class:`Communicator` for ``mode`` on ``group`` (``None``: the world), or ``None``
    when the step is single-process (``"off"``, or ``"auto"`` without an initialised process
    group of more than one rank)."""
    if mode not in _MODES:
        raise ValueError(f"`distributed` should be one of {_MODES}, but got {mode!r}.")
    if mode == "off":
        return None
    if not _dist_ready():
        if mode == "auto":
            return None
        raise RuntimeError(
            f"distributed={mode!r} needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the first step."
        )
    size = torch.distributed.get_world_size(group)
    if size == 1 and mode == "auto":
        return None
    return Communicator("global" if mode == "auto" else mode, group)


class Communicator:
    """The collectives of a distributed JD step over one process group.

    ``stats`` counts, per collective, the calls and the bytes of the tensors each rank hands to
    it (eager calls only): ``all_reduce`` and ``broadcast`` count the tensor, ``all_gather``
    the local tensor. With the ring algorithms of NCCL and gloo a rank then *sends*
    :math:`2\\frac{R-1}{R}` times the all-reduce bytes and :math:`R-1` times the all-gather
    bytes (see the distributed-training docs page).
    """

    def __init__(self, mode: str, group: object | None = None) -> None:
        import torch.distributed as dist

        self.mode = mode
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.checked = False
        self.stats: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"Communicator(mode={self.mode!r}, world_size={self.world_size})"

    # ------------------------------------------------------------------ bookkeeping

    def _count(self, op: str, nbytes: int) -> None:
        if torch.compiler.is_compiling():
            return
        calls_bytes = self.stats.setdefault(op, [0, 0])
        calls_bytes[0] += 1
        calls_bytes[1] += nbytes

    def reset_stats(self) -> None:
        self.stats = {}

    def bytes(self) -> int:
        """Total bytes handed to collectives since the last :meth:`reset_stats`."""
        return sum(b for _, b in self.stats.values())

    # ------------------------------------------------------------------ collectives

    @staticmethod
    def _wait(t: Tensor) -> Tensor:
        wait = getattr(t, "wait", None)
        return wait() if callable(wait) and not torch.compiler.is_compiling() else t

    def reduce(self, tensors: Sequence[Tensor], op: Literal["sum", "avg"] = "sum") -> list[Tensor]:
        """All-reduce ``tensors`` (one bucket per dtype): the sum or the mean over ranks."""
        from torch.distributed import _functional_collectives as funcol

        if op not in ("sum", "avg"):
            raise ValueError(f"`op` should be 'sum' or 'avg', got {op!r}.")
        out: list[Tensor | None] = [None] * len(tensors)
        for _dtype, idx in _by_dtype(tensors).items():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            self._count("all_reduce", flat.numel() * flat.element_size())
            summed = self._wait(funcol.all_reduce(flat, "sum", self.group))
            if op == "avg":
                summed = summed / self.world_size
            for i, piece in zip(idx, summed.split([tensors[i].numel() for i in idx]), strict=True):
                out[i] = piece.reshape(tensors[i].shape)
        return out  # type: ignore[return-value]

    def reduce_scatter(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sum over ranks of each ``tensor`` (first dimension ``R c``), of which this rank
        keeps rows ``[rank c, (rank + 1) c)`` (one bucket per dtype)."""
        from torch.distributed import _functional_collectives as funcol

        R = self.world_size
        out: list[Tensor | None] = [None] * len(tensors)
        for _dtype, idx in _by_dtype(tensors).items():
            flat = torch.cat([tensors[i].reshape(R, -1) for i in idx], dim=1).reshape(-1)
            self._count("reduce_scatter", flat.numel() * flat.element_size())
            mine = self._wait(funcol.reduce_scatter_single(flat, "sum", 0, self.group))
            sizes = [tensors[i].numel() // R for i in idx]
            for i, piece in zip(idx, mine.split(sizes), strict=True):
                out[i] = piece.reshape(tensors[i].shape[0] // R, *tensors[i].shape[1:])
        return out  # type: ignore[return-value]

    def max(self, tensor: Tensor) -> Tensor:
        """The elementwise maximum over ranks."""
        from torch.distributed import _functional_collectives as funcol

        self._count("all_reduce", tensor.numel() * tensor.element_size())
        return self._wait(funcol.all_reduce(tensor, "max", self.group))

    def gather(
        self,
        tensors: Sequence[Tensor],
        dims: Sequence[int],
        sizes: Sequence[int] | None = None,
    ) -> list[Tensor]:
        """All-gather ``tensors`` and concatenate each along its ``dims`` entry, in rank order
        (one bucket per dtype).

        ``sizes`` (eager only): the size of that dimension on every rank, when it differs
        (the tensors are padded to the largest and the padding is dropped); ``None``: the same
        on every rank.
        """
        from torch.distributed import _functional_collectives as funcol

        R = self.world_size
        big = None if sizes is None or len(set(sizes)) == 1 else max(sizes)
        moved = []
        for t, d in zip(tensors, dims, strict=True):
            t = t.movedim(d, 0)
            if big is not None and t.shape[0] != big:
                pad = t.new_zeros(big - t.shape[0], *t.shape[1:])
                t = torch.cat([t, pad])
            moved.append(t)
        out: list[Tensor | None] = [None] * len(tensors)
        for _dtype, idx in _by_dtype(moved).items():
            flat = torch.cat([moved[i].reshape(-1) for i in idx])
            self._count("all_gather", flat.numel() * flat.element_size())
            full = self._wait(funcol.all_gather_single(flat, 0, self.group)).reshape(R, -1)
            pieces = full.split([moved[i].numel() for i in idx], dim=1)
            for i, piece in zip(idx, pieces, strict=True):
                local = moved[i].shape
                per_rank = piece.reshape(R, *local)
                if big is not None:
                    assert sizes is not None
                    g = torch.cat([per_rank[r, : sizes[r]] for r in range(R)])
                else:
                    g = per_rank.reshape(R * local[0], *local[1:])
                out[i] = g.movedim(0, dims[i])
        return out  # type: ignore[return-value]

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``tensor`` on every rank (group rank)."""
        from torch.distributed import _functional_collectives as funcol

        self._count("broadcast", tensor.numel() * tensor.element_size())
        return self._wait(funcol.broadcast(tensor.contiguous(), src, self.group))

    # ------------------------------------------------------------------ checks (eager only)

    def loss_shapes(self, losses: Tensor, batch_dim: int | None) -> list[int] | None:
        """Check the losses' shapes across ranks; return every rank's size along ``batch_dim``.

        Batch-mean losses (``batch_dim=None``) must have the same shape on every rank: checked
        on the first call only (returns ``None``). Per-sample losses may differ along
        ``batch_dim`` only: checked on every eager call, since the sizes are needed to gather
        uneven batches exactly (one all-gather of a few integers and one host read). Under
        ``torch.compile`` nothing is exchanged: every rank's batch is assumed as large as
        this one's (use ``drop_last=True``). Every rank raises the same error.
        """
        if torch.compiler.is_compiling():
            return None if batch_dim is None else [losses.shape[batch_dim]] * self.world_size
        if batch_dim is None and self.checked:
            return None
        import torch.distributed as dist

        shape = list(losses.shape)
        if len(shape) > 15:
            raise ValueError("Losses with more than 15 dimensions are not supported.")
        row = torch.full((16,), -1, dtype=torch.int64)
        row[0] = len(shape)
        row[1 : 1 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row, group=self.group)  # eager-only check (host read below)
        self._count("all_gather", row.numel() * row.element_size())
        shapes = [tuple(r[1 : 1 + int(r[0])].tolist()) for r in rows]
        self.checked = True
        if batch_dim is None:
            if len(set(shapes)) > 1:
                raise ValueError(
                    "The losses have different shapes on different ranks: "
                    f"{dict(enumerate(shapes))}. Batch-mean losses must have the same shape on "
                    "every rank (pass batch_dim= for per-sample losses)."
                )
            return None
        stripped = {s[:batch_dim] + s[batch_dim + 1 :] if len(s) > batch_dim else s for s in shapes}
        if len(stripped) > 1 or any(len(s) <= batch_dim for s in shapes):
            raise ValueError(
                "The per-sample losses have different shapes on different ranks beyond the "
                f"batch dimension {batch_dim}: {dict(enumerate(shapes))}."
            )
        return [s[batch_dim] for s in shapes]

    def all_true(self, flag: Tensor) -> Tensor:
        """Whether ``flag`` (a 0-d bool) holds on every rank (one tiny all-reduce)."""
        bad = (~flag).to(torch.float32).reshape(1)
        return self.reduce([bad], "sum")[0].reshape(()) == 0


def _by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def batch_slice(tensor: Tensor, dim: int, sizes: Sequence[int], rank: int) -> Tensor:
    """This rank's part of a tensor concatenated along ``dim`` from parts of ``sizes``.

    >>> batch_slice(torch.arange(5), 0, [2, 3], 1)
    tensor([2, 3, 4])
    """
    start = sum(sizes[:rank])
    return tensor.narrow(dim, start, sizes[rank])


def check_supported(params: Sequence[Tensor], model: object | None = None) -> None:
    """Raise for the wrappers and setups JD cannot run on: DeepSpeed (ZeRO partitions the
    parameters behind its own engine) and FSDP1 (``FullyShardedDataParallel``, flat
    parameters).

    >>> check_supported([torch.nn.Parameter(torch.ones(2))])
    """
    wrapped = model
    kind = type(wrapped).__module__ if wrapped is not None else ""
    if kind.startswith("deepspeed") or any(hasattr(p, "ds_id") for p in params):
        raise TypeError(
            "DeepSpeed is not supported by JDOptimizer (its engine owns the backward and "
            "partitions the parameters). Use DDP or FSDP2 (torch.distributed.fsdp.fully_shard)."
        )
    if not _dist_ready():  # FSDP needs a process group: single processes skip the imports
        return
    flat = _flat_param_type()
    fsdp1 = _fsdp1_type()
    if (flat is not None and any(isinstance(p, flat) for p in params)) or (
        fsdp1 is not None and wrapped is not None and isinstance(wrapped, fsdp1)
    ):
        raise TypeError(
            "FSDP1 (FullyShardedDataParallel) is not supported by JDOptimizer: its flat "
            "parameters hide the per-parameter Jacobian. Use DDP, or see the distributed docs "
            "page for FSDP2."
        )


def check_sharded(params: Sequence[Tensor], engine: object, mode: str) -> None:
    """FSDP2 (``fully_shard``: DTensor parameters) runs with the layer-wise engine only, when
    every parameter is covered by a layer rule (the exact fallback differentiates the
    parameters themselves, which FSDP2 keeps out of the autograd graph), in the global or
    local mode."""
    if not _dist_ready():  # DTensors need a process group
        return
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return
    if mode == "off":
        raise TypeError("Sharded (DTensor) parameters need distributed='global' or 'local'.")
    if getattr(engine, "name", None) == "jacobian":
        return  # differentiates FSDP2's unsharded parameters (see fsdp2_unsharded)
    generic = getattr(engine, "_generic", None)
    if getattr(engine, "name", None) != "layerwise" or generic is None:
        raise TypeError(
            "Sharded (DTensor) parameters, e.g. FSDP2's fully_shard, are supported with the "
            "layer-wise engine (per-sample losses: model= and batch_dim=) and the Jacobian "
            f"engine (with model=); got {engine!r}. Use DDP for the other engines."
        )
    if generic or getattr(engine, "_vmapped", None):
        # The generic per-module rule (vmap of the module's own vjp) does not run on DTensors.
        names = [k for k, v in engine.report().items() if v.startswith(("generic", "vmap"))]  # type: ignore[attr-defined]
        raise TypeError(
            "With sharded (DTensor) parameters every parameter must sit in a layer the "
            "layer-wise engine covers (Linear, Conv1d/2d, Embedding, norms); these are not: "
            f"{sorted(names)}."
        )


def fsdp2_unsharded(model: object | None, params: Sequence[Tensor]) -> dict[int, object] | None:
    """For FSDP2 (DTensor) parameters: ``id(sharded parameter) -> FSDPParam`` over the
    ``fully_shard`` modules of ``model``, whose ``unsharded_param`` is the tensor the forward
    pass uses (the one to differentiate). ``None`` when no parameter is sharded."""
    if not _dist_ready():
        return None
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return None
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "With FSDP2 (sharded parameters) and the Jacobian engine, pass the fully_shard "
            "model as `model=`: JD differentiates FSDP2's unsharded parameters."
        )
    found: dict[int, object] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group  # FSDP2 internals (torch 2.13)
        for fsdp_param in [] if group is None else group.fsdp_params:
            found[id(fsdp_param.sharded_param)] = fsdp_param
    missing = [i for i, p in enumerate(params) if isinstance(p, dtensor) and id(p) not in found]
    if missing:
        raise TypeError(
            f"Parameters {missing} are sharded but belong to no fully_shard module of `model`."
        )
    return found


def check_sharded_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Raise when a sharded (DTensor) parameter got no gradient: the engine differentiated the
    sharded parameter itself, which FSDP2 keeps out of the autograd graph (e.g. the layer-wise
    engine's exact fallback for a layer it does not cover), so the update would silently miss
    it. Every rank raises the same error (the cause is structural)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return
    missing = [i for i, (p, g) in enumerate(zip(params, grads, strict=True))
               if g is None and isinstance(p, dtensor)]  # fmt: skip
    if missing:
        raise TypeError(
            f"Sharded (FSDP2) parameters {missing} got no gradient: the engine could not "
            "differentiate them through FSDP2 (a layer the layer-wise engine does not cover, or "
            "a parameter the losses do not use). Nothing was written."
        )


def to_param_layout(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` (the same full tensor on every rank) laid out like ``param``: for a DTensor
    parameter (FSDP2) this rank's shard, cut locally without communication."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor) or isinstance(grad, dtensor):
        return grad
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)


def _flat_param_type() -> type | None:
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except Exception:  # pragma: no cover - torch without distributed
        return None
    return FlatParameter


def _fsdp1_type() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except Exception:  # pragma: no cover
        return None
    return FullyShardedDataParallel


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover
        return None
    return DTensor


__all__ = [
    "Communicator",
    "DistributedMode",
    "batch_slice",
    "check_sharded",
    "check_sharded_grads",
    "fsdp2_unsharded",
    "check_supported",
    "to_param_layout",
    "resolve_mode",
]
