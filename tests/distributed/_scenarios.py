"""Distributed scenarios (run on every rank by :mod:`tests.distributed._harness`).

Each returns this rank's parameters after a few float64 steps under the distributed mode and,
on rank 0, ``ref``: the same steps in one process (``distributed="off"``) on the concatenated
batch (or, for the local mode, its own definition).
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jdoptim import JDOptimizer, NonFiniteError
from jdoptim.aggregation import ConFIG, MeanWeighting, UPGradWeighting
from jdoptim.gramian import MultiTaskGramianEngine

from ..optimizer._helpers import InverseNormWeighting

STEPS = 4
DT = torch.float64


def _mlp(seed: int = 0, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, d_out)).to(DT)


class _MTNet(nn.Module):
    def __init__(self, seed: int = 0, m: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(m))
        self.to(DT)

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk(x)
        return torch.cat([h(z) for h in self.heads], dim=1)


def _batch(step: int, n: int, d_out: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


def _shard(t: Tensor, rank: int, sizes: list[int]) -> Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _inner(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=0.01)


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _mse_tasks(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(0)


def _mse_samples(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).sum(1)


def _mse_generalized(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y) ** 2  # [B, 3]


def _compare(
    rank: int,
    world: int,
    build: Callable[[nn.Module, str], JDOptimizer],
    loss_fn: LossFn,
    *,
    model_fn: Callable[[], nn.Module] = _mlp,
    inner: str = "sgd",
    sizes: list[int] | None = None,
    wrap_ddp: bool = False,
    mode: str = "auto",
) -> dict:
    """Train distributed (``build(model, mode)``) and, on rank 0, in one process."""
    sizes = sizes or [4] * world
    n = sum(sizes)
    model = model_fn()
    forward = DDP(model) if wrap_ddp else model
    opt = build(model, mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            x, y = _batch(step, n)
            opt.zero_grad()
            opt.step(loss_fn(forward, _shard(x, rank, sizes), _shard(y, rank, sizes)))
    out: dict = {
        "params": _params(model),
        "mode": repr(opt.communicator),
        "warnings": [str(w.message) for w in caught],
    }
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        out.update(model=model, types=sorted({type(p).__name__ for p in model.parameters()}))
        return out
    if rank == 0:
        ref = model_fn()
        ref_opt = build(ref, "off")
        for step in range(STEPS):
            x, y = _batch(step, n)
            ref_opt.zero_grad()
            ref_opt.step(loss_fn(ref, x, y))
        out["ref"] = _params(ref)
    return out


def _upgrad(inner: str = "sgd", **kw) -> Callable[[nn.Module, str], JDOptimizer]:
    def build(model: nn.Module, mode: str) -> JDOptimizer:
        return JDOptimizer(_inner(model, inner), UPGradWeighting(), distributed=mode, **kw)

    return build


def mtl_plain_sgd(rank: int, world: int) -> dict:
    return _compare(rank, world, _upgrad("sgd"), _mse_tasks)


def mtl_ddp_adam(rank: int, world: int) -> dict:
    return _compare(rank, world, _upgrad("adam"), _mse_tasks, inner="adam", wrap_ddp=True)


def _layerwise(inner: str, wrap: bool = False) -> Callable[[nn.Module, str], JDOptimizer]:
    def build(model: nn.Module, mode: str) -> JDOptimizer:
        return JDOptimizer(
            _inner(model, inner), UPGradWeighting(), model=model, batch_dim=0, distributed=mode
        )

    return build


def per_sample_layerwise(rank: int, world: int) -> dict:
    out = _compare(rank, world, _layerwise("sgd"), _mse_samples)
    return out


def per_sample_layerwise_ddp_adam(rank: int, world: int) -> dict:
    return _compare(rank, world, _layerwise("adam"), _mse_samples, inner="adam", wrap_ddp=True)


def per_sample_uneven(rank: int, world: int) -> dict:
    sizes = [3 + r for r in range(world)]
    return _compare(rank, world, _layerwise("sgd"), _mse_samples, sizes=sizes)


def generalized_bk(rank: int, world: int) -> dict:
    return _compare(rank, world, _layerwise("adam"), _mse_generalized, inner="adam")


def per_sample_mean_is_ddp(rank: int, world: int) -> dict:
    """MeanWeighting on per-sample losses is DDP on the mean loss."""

    def build(model: nn.Module, mode: str) -> JDOptimizer:
        return JDOptimizer(
            _inner(model, "sgd"), MeanWeighting(), model=model, batch_dim=0, distributed=mode
        )

    out = _compare(rank, world, build, _mse_samples)
    model = _mlp()
    ddp = DDP(model)
    sgd = _inner(model, "sgd")
    for step in range(STEPS):
        x, y = _batch(step, 4 * world)
        sgd.zero_grad()
        _mse_samples(
            ddp, _shard(x, rank, [4] * world), _shard(y, rank, [4] * world)
        ).mean().backward()
        sgd.step()
    out["ref"] = _params(model) if rank == 0 else None
    return out


def multitask_engine(rank: int, world: int) -> dict:
    def build(model: nn.Module, mode: str) -> JDOptimizer:
        engine = MultiTaskGramianEngine(model.trunk, model.heads)
        return JDOptimizer(
            _inner(model, "adam"), UPGradWeighting(), engine=engine, distributed=mode
        )

    def losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        module = model.module if isinstance(model, DDP) else model
        z = module.trunk(x)
        return torch.stack(
            [((h(z)[:, 0] - y[:, k]) ** 2).mean() for k, h in enumerate(module.heads)]
        )

    return _compare(rank, world, build, losses, model_fn=_MTNet, inner="adam")


def config_jacobian(rank: int, world: int) -> dict:
    def build(model: nn.Module, mode: str) -> JDOptimizer:
        return JDOptimizer(_inner(model, "sgd"), ConFIG(), distributed=mode)

    return _compare(rank, world, build, _mse_tasks)


def config_per_sample(rank: int, world: int) -> dict:
    def build(model: nn.Module, mode: str) -> JDOptimizer:
        return JDOptimizer(_inner(model, "sgd"), ConFIG(), batch_dim=0, distributed=mode)

    return _compare(rank, world, build, _mse_samples)


def local_mode(rank: int, world: int) -> dict:
    """Each rank: JD on its own losses; gradients averaged; then the inner step."""
    sizes = [4] * world
    model = _mlp()
    opt = JDOptimizer(_inner(model, "sgd"), UPGradWeighting(), distributed="local")
    for step in range(STEPS):
        x, y = _batch(step, sum(sizes))
        opt.zero_grad()
        opt.step(_mse_tasks(model, _shard(x, rank, sizes), _shard(y, rank, sizes)))
    out: dict = {"params": _params(model), "mode": repr(opt.communicator)}
    if rank == 0:
        ref = _mlp()
        ref_opt = JDOptimizer(_inner(ref, "sgd"), UPGradWeighting(), distributed="off")
        for step in range(STEPS):
            x, y = _batch(step, sum(sizes))
            grads = []
            for r in range(world):
                ref_opt.zero_grad()
                ref_opt.backward(_mse_tasks(ref, _shard(x, r, sizes), _shard(y, r, sizes)))
                grads.append([p.grad.clone() for p in ref.parameters()])
            for i, p in enumerate(ref.parameters()):
                p.grad = sum(g[i] for g in grads) / world
            ref_opt.step()
        out["ref"] = _params(ref)
    return out


def off_diverges(rank: int, world: int) -> dict:
    """Control: with distributed="off" a DDP model's replicas drift (what the global mode fixes)."""
    return _compare(rank, world, _upgrad("sgd"), _mse_tasks, wrap_ddp=True, mode="off")


def fsdp2_layerwise(rank: int, world: int) -> dict:
    """FSDP2 (fully_shard per layer and at the root) with per-sample losses and the layer-wise
    engine: the global step, each rank writing its shard of the gradient; and the clear error
    for an engine that FSDP2 cannot serve."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def sharded() -> nn.Module:
        model = _mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    out = _compare(rank, world, _layerwise("adam"), _mse_samples, model_fn=sharded, inner="adam")
    # Every rank holds its shard: compare the full tensors (one all-gather each).
    out["params"] = [p.full_tensor() for p in sharded_params(out.pop("model"))]
    out["shard_types"] = out.pop("types")
    if rank == 0:
        ref = _mlp()
        ref_opt = _layerwise("adam")(ref, "off")
        for step in range(STEPS):
            x, y = _batch(step, 4 * world)
            ref_opt.zero_grad()
            ref_opt.step(_mse_samples(ref, x, y))
        out["ref"] = _params(ref)
    # The local mode on sharded parameters: per-rank JD, averaged, each rank's shard written.
    model = sharded()
    opt = JDOptimizer(
        _inner(model, "sgd"), UPGradWeighting(), model=model, batch_dim=0, distributed="local"
    )
    for step in range(2):
        x, y = _batch(step, 4 * world)
        opt.zero_grad()
        opt.step(_mse_samples(model, _shard(x, rank, [4] * world), _shard(y, rank, [4] * world)))
    out["local"] = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        ref = _mlp()
        ref_opt = JDOptimizer(
            _inner(ref, "sgd"), UPGradWeighting(), model=ref, batch_dim=0, distributed="off"
        )
        for step in range(2):
            x, y = _batch(step, 4 * world)
            grads = []
            for r in range(world):
                ref_opt.zero_grad()
                ref_opt.backward(_mse_samples(ref, _shard(x, r, [4] * world),
                                              _shard(y, r, [4] * world)))  # fmt: skip
                grads.append([p.grad.clone() for p in ref.parameters()])
            for i, p in enumerate(ref.parameters()):
                p.grad = sum(g[i] for g in grads) / world
            ref_opt.step()
        out["local_ref"] = _params(ref)
    try:
        model = sharded()
        engine = MultiTaskGramianEngine(model[0], [model[2]])
        JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting(), engine=engine)
    except TypeError as error:
        out["multitask_error"] = str(error)
    try:
        JDOptimizer(torch.optim.SGD(sharded().parameters(), lr=0.1), UPGradWeighting())
    except TypeError as error:
        out["no_model_error"] = str(error)
    return out


def fsdp2_jacobian(rank: int, world: int) -> dict:
    """FSDP2 with batch-mean multi-task losses and the Jacobian engine (UPGrad, then ConFIG):
    JD differentiates the unsharded parameters, all-reduces J, each rank writes its shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def sharded() -> nn.Module:
        model = _mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    out: dict = {}
    for name, weighting in (("upgrad", UPGradWeighting()), ("config", ConFIG())):
        model = sharded()
        opt = JDOptimizer(_inner(model, "adam"), weighting, model=model)
        for step in range(STEPS):
            x, y = _batch(step, 4 * world)
            opt.zero_grad()
            opt.step(_mse_tasks(model, _shard(x, rank, [4] * world), _shard(y, rank, [4] * world)))
        out[name] = [p.full_tensor() for p in model.parameters()]
        out[f"{name}_ops"] = sorted(opt.communicator.stats)
        try:
            copy.deepcopy(opt)
        except TypeError as error:
            out["copy_error"] = str(error)
        if rank == 0:
            ref = _mlp()
            ref_opt = JDOptimizer(_inner(ref, "adam"), weighting, distributed="off")
            for step in range(STEPS):
                x, y = _batch(step, 4 * world)
                ref_opt.zero_grad()
                ref_opt.step(_mse_tasks(ref, x, y))
            out[f"{name}_ref"] = _params(ref)
    return out


def sharded_params(model: nn.Module) -> list[Tensor]:
    return list(model.parameters())


def errors(rank: int, world: int) -> dict:
    out: dict = {}
    # Mismatched loss shapes: every rank raises on the first step.
    model = _mlp(d_out=3)
    opt = JDOptimizer(_inner(model, "sgd"), UPGradWeighting())
    x, y = _batch(0, 4)
    before = _params(model)
    try:
        opt.step(_mse_tasks(model, x, y)[: 2 + (rank % 2)])
    except ValueError as error:
        out["shapes"] = str(error)
    out["shapes_untouched"] = all(
        torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)
    )
    # A rank with non-finite losses: every rank raises (global and local), nothing written.
    for mode in ("global", "local"):
        model = _mlp()
        opt = JDOptimizer(_inner(model, "sgd"), UPGradWeighting(), distributed=mode)
        before = _params(model)
        losses = _mse_tasks(model, x, y)
        if rank == world - 1:
            losses = losses * torch.tensor([1.0, float("nan"), 1.0], dtype=DT)
        try:
            opt.step(losses)
        except NonFiniteError as error:
            out[f"nonfinite_{mode}"] = str(error)
        out[f"nonfinite_{mode}_untouched"] = all(
            torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)
        ) and all(p.grad is None for p in model.parameters())
        # The group still works afterwards.
        opt.zero_grad()
        opt.step(_mse_tasks(model, x, y))
        out[f"nonfinite_{mode}_then"] = _params(model)
    # A Scalarizer has no distributed step: refused before any backward.
    from jdoptim.scalarization import Mean as MeanScalarizer

    model = _mlp()
    opt = JDOptimizer(_inner(model, "sgd"), MeanScalarizer())
    try:
        opt.step(_mse_tasks(model, x, y))
    except NotImplementedError as error:
        out["scalarizer"] = str(error)
    out["scalarizer_untouched"] = all(p.grad is None for p in model.parameters())
    # FSDP1: a clear error at construction.
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(_mlp().float(), device_id=torch.device("cpu"))
        JDOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1), UPGradWeighting())
    except TypeError as error:
        out["fsdp1"] = str(error)
    except Exception as error:  # FSDP1 cannot even be built here
        out["fsdp1"] = f"not built: {type(error).__name__}: {error}"
    return out


def checkpoint_resume(rank: int, world: int) -> dict:
    """Save on rank 0 after 2 steps, load on every rank, continue: bit-identical."""
    sizes = [4] * world

    def steps(model: nn.Module, opt: JDOptimizer, first: int, last: int) -> None:
        for step in range(first, last):
            x, y = _batch(step, sum(sizes))
            opt.zero_grad()
            opt.step(_mse_samples(model, _shard(x, rank, sizes), _shard(y, rank, sizes)))

    model = _mlp()
    opt = _layerwise("adam")(model, "auto")
    steps(model, opt, 0, 2)
    buffer = None
    if rank == 0:
        f = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
        buffer = f.getvalue()
    shared = [buffer]
    dist.broadcast_object_list(shared, src=0)
    steps(model, opt, 2, 4)
    continued = _params(model)
    state = torch.load(io.BytesIO(shared[0]), weights_only=False)
    resumed = _mlp(seed=7)
    resumed_opt = _layerwise("adam")(resumed, "auto")
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["opt"])
    steps(resumed, resumed_opt, 2, 4)
    return {"continued": continued, "resumed": _params(resumed)}


def accumulation(rank: int, world: int) -> dict:
    """Two micro-batches per step (two backward calls, then step), per-sample and batch-mean."""
    sizes = [4] * world
    out: dict = {}
    for name, build, loss_fn in (
        ("per_sample", _layerwise("sgd"), _mse_samples),
        ("tasks", _upgrad("sgd"), _mse_tasks),
    ):
        models = {}
        for mode in ("auto", "off"):
            if mode == "off" and rank != 0:
                continue
            model = _mlp()
            opt = build(model, mode)
            for step in range(STEPS):
                opt.zero_grad()
                for micro in range(2):
                    x, y = _batch(10 * step + micro, sum(sizes))
                    if mode == "auto":
                        x, y = _shard(x, rank, sizes), _shard(y, rank, sizes)
                    opt.backward(loss_fn(model, x, y))
                opt.step()
            models[mode] = _params(model)
        out[name] = models["auto"]
        out[f"{name}_ref"] = models.get("off")
    return out


def extras(rank: int, world: int) -> dict:
    """AMP (CPU autocast, bfloat16), the local mode on per-sample losses, and
    nonfinite="skip" in the global mode (every rank skips together)."""
    sizes = [4] * world
    out: dict = {}
    # AMP: float32 model, bf16 autocast forward; per-sample global step.
    for mode in ("auto", "off"):
        if mode == "off" and rank != 0:
            continue
        model = _mlp().float()
        opt = _layerwise("adam")(model, mode)
        for step in range(STEPS):
            x, y = _batch(step, sum(sizes))
            if mode == "auto":
                x, y = _shard(x, rank, sizes), _shard(y, rank, sizes)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = _mse_samples(model, x.float(), y.float()).float()
            opt.zero_grad()
            opt.step(losses)
        out[f"amp_{mode}"] = _params(model)
    # Local mode, per-sample losses: per-rank JD, gradients averaged.
    model = _mlp()
    opt = JDOptimizer(
        _inner(model, "sgd"), UPGradWeighting(), model=model, batch_dim=0, distributed="local"
    )
    for step in range(STEPS):
        x, y = _batch(step, sum(sizes))
        opt.zero_grad()
        opt.step(_mse_samples(model, _shard(x, rank, sizes), _shard(y, rank, sizes)))
    out["local_samples"] = _params(model)
    if rank == 0:
        ref = _mlp()
        ref_opt = JDOptimizer(
            _inner(ref, "sgd"), UPGradWeighting(), model=ref, batch_dim=0, distributed="off"
        )
        for step in range(STEPS):
            x, y = _batch(step, sum(sizes))
            grads = []
            for r in range(world):
                ref_opt.zero_grad()
                ref_opt.backward(_mse_samples(ref, _shard(x, r, sizes), _shard(y, r, sizes)))
                grads.append([p.grad.clone() for p in ref.parameters()])
            for i, p in enumerate(ref.parameters()):
                p.grad = sum(g[i] for g in grads) / world
            ref_opt.step()
        out["local_samples_ref"] = _params(ref)
    # nonfinite="skip": one rank's NaN makes every rank skip the step.
    model = _mlp()
    opt = JDOptimizer(
        _inner(model, "sgd"), UPGradWeighting(), model=model, batch_dim=0, nonfinite="skip"
    )
    before = _params(model)
    x, y = _batch(0, sum(sizes))
    losses = _mse_samples(model, _shard(x, rank, sizes), _shard(y, rank, sizes))
    if rank == 0:
        losses = losses * torch.tensor([1.0, float("inf"), 1.0, 1.0], dtype=DT)
    opt.step(losses)
    out["skip_untouched"] = all(
        torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)
    )
    out["skipped_steps"] = opt.skipped_steps
    return out


def compiled(rank: int, world: int) -> dict:
    """The JD part (forward, losses, opt.backward) compiled with its collectives == eager; no
    recompilation over 10 steps. The aot_eager backend (Dynamo capture and AOT autograd with
    the functional collectives, no Inductor code generation) keeps the test fast; Inductor
    gives the same result (checked by hand, see docs/distributed.rst)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    sizes = [4] * world
    out: dict = {}
    for name in ("layerwise",):
        runs = {}
        for mode in ("eager", "compiled"):
            model = _mlp()
            # A cheap weighting that reads the (global) Gramian: the solver's compile is
            # tested elsewhere.
            opt = JDOptimizer(
                _inner(model, "sgd"), InverseNormWeighting(), model=model, batch_dim=0
            )
            loss_fn = _mse_samples

            def jd_part(x: Tensor, y: Tensor, model=model, opt=opt, loss_fn=loss_fn) -> Tensor:
                weights = opt.backward(loss_fn(model, x, y))
                assert weights is not None
                return weights

            fn = (
                torch.compile(
                    jd_part,
                    fullgraph=True,
                    backend=os.environ.get("JDOPTIM_TEST_DIST_BACKEND", "aot_eager"),
                )
                if mode == "compiled"
                else jd_part
            )
            torch._dynamo.reset()
            counters.clear()
            for step in range(10):
                x, y = _batch(step, sum(sizes))
                opt.zero_grad()
                fn(_shard(x, rank, sizes), _shard(y, rank, sizes))
                opt.step()
            runs[mode] = _params(model)
            if mode == "compiled":
                out[f"{name}_frames"] = int(counters["stats"]["unique_graphs"])
                out[f"{name}_breaks"] = int(sum(counters["graph_break"].values()))
        out[f"{name}_eager"], out[f"{name}_compiled"] = runs["eager"], runs["compiled"]
    return out


SCENARIOS: dict[str, Callable[[int, int], dict]] = {
    f.__name__: f
    for f in (
        mtl_plain_sgd,
        mtl_ddp_adam,
        per_sample_layerwise,
        per_sample_layerwise_ddp_adam,
        per_sample_uneven,
        generalized_bk,
        per_sample_mean_is_ddp,
        multitask_engine,
        config_jacobian,
        config_per_sample,
        local_mode,
        errors,
        fsdp2_layerwise,
        fsdp2_jacobian,
        off_diverges,
        accumulation,
        extras,
        checkpoint_resume,
        compiled,
    )
}

__all__ = ["SCENARIOS"]
