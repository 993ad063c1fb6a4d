"""Distributed Jacobian descent on 2 and 3 gloo ranks (CPU): exact global steps, the local mode,
errors, checkpoints and compile. Many scenarios share one process group per test (see
``_scenarios.py``) to keep the suite fast."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from jdoptim import JDOptimizer
from jdoptim.aggregation import MeanWeighting, UPGradWeighting
from jdoptim.distributed import batch_slice, check_supported, resolve_mode

from . import _harness

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

MODULE = "tests.distributed._scenarios"
EXACT = [
    "mtl_plain_sgd",
    "mtl_ddp_adam",
    "per_sample_layerwise",
    "per_sample_layerwise_ddp_adam",
    "per_sample_uneven",
    "generalized_bk",
    "per_sample_mean_is_ddp",
    "multitask_engine",
    "config_jacobian",
    "config_per_sample",
    "local_mode",
    "fsdp2_layerwise",
]


def _ok(results: list[dict], name: str) -> list[dict]:
    per_rank = [r[name] for r in results]
    for rank, r in enumerate(per_rank):
        assert "error" not in r, f"{name} failed on rank {rank}:\n{r.get('trace')}"
    return per_rank


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


def _check_exact(results: list[dict], world: int) -> None:
    for name in EXACT:
        if name not in results[0]:
            continue
        per_rank = _ok(results, name)
        mode = "local" if name == "local_mode" else "global"
        assert per_rank[0]["mode"] == f"Communicator(mode='{mode}', world_size={world})"
        for r in per_rank[1:]:
            assert _bitwise(r["params"], per_rank[0]["params"]), f"{name}: ranks differ"
        assert _rel(per_rank[0]["params"], per_rank[0]["ref"]) <= 1e-9, name
        for r in per_rank:
            assert not r.get("warnings"), f"{name}: warnings {r['warnings']}"


def _check_errors(results: list[dict], world: int) -> None:
    for r in _ok(results, "errors"):
        assert "different shapes on different ranks" in r["shapes"]
        assert r["shapes_untouched"]
        for mode in ("global", "local"):
            assert "NaN or inf" in r[f"nonfinite_{mode}"]
            assert r[f"nonfinite_{mode}_untouched"]
        assert "FSDP1" in r["fsdp1"]
        assert "distributed='off'" in r["scalarizer"] and r["scalarizer_untouched"]
    first = results[0]["errors"]
    for r in results[1:]:
        for mode in ("global", "local"):
            key = f"nonfinite_{mode}_then"
            assert _bitwise(r["errors"][key], first[key])


def test_two_ranks() -> None:
    names = [*EXACT, "off_diverges", "errors", "checkpoint_resume", "accumulation", "compiled",
             "fsdp2_jacobian", "extras"]  # fmt: skip
    results = _harness.run(2, MODULE, names, timeout=420)
    _check_exact(results, 2)
    _check_errors(results, 2)
    # Control: without the distributed mode DDP replicas drift apart.
    off = _ok(results, "off_diverges")
    assert _rel(off[0]["params"], off[1]["params"]) > 1e-3
    # The local mode is its own algorithm, not the global step.
    local, glob = results[0]["local_mode"]["params"], results[0]["mtl_plain_sgd"]["params"]
    assert _rel(local, glob) > 1e-6
    acc = _ok(results, "accumulation")
    for name in ("per_sample", "tasks"):
        assert _rel(acc[0][name], acc[0][f"{name}_ref"]) <= 1e-9
        assert _bitwise(acc[0][name], acc[1][name])
    extras = _ok(results, "extras")
    # AMP: identical ranks, and close to one process (bf16 forward: not bitwise).
    assert _bitwise(extras[0]["amp_auto"], extras[1]["amp_auto"])
    assert _rel(extras[0]["amp_auto"], extras[0]["amp_off"]) <= 2e-2
    assert _rel(extras[0]["local_samples"], extras[0]["local_samples_ref"]) <= 1e-9
    assert _bitwise(extras[0]["local_samples"], extras[1]["local_samples"])
    for r in extras:
        assert r["skip_untouched"] and r["skipped_steps"] == 1
    for r in _ok(results, "checkpoint_resume"):
        assert _bitwise(r["continued"], r["resumed"])
    assert _bitwise(results[0]["checkpoint_resume"]["resumed"],
                    results[1]["checkpoint_resume"]["resumed"])  # fmt: skip
    _check_compiled(results)
    fsdp2 = _ok(results, "fsdp2_layerwise")
    assert fsdp2[0]["shard_types"] == ["DTensor"]
    assert "supported with the layer-wise engine" in fsdp2[0]["multitask_error"]
    assert _rel(fsdp2[0]["local"], fsdp2[0]["local_ref"]) <= 1e-9
    assert _bitwise(fsdp2[0]["local"], fsdp2[1]["local"])
    assert "pass the fully_shard model as `model=`" in fsdp2[0]["no_model_error"]
    jac = _ok(results, "fsdp2_jacobian")
    assert "FSDP2 (sharded) parameters cannot be copied" in jac[0]["copy_error"]
    # UPGrad: the shard-wise route (reduce-scatter J, all-reduce the partial Gramians);
    # ConFIG needs the whole Jacobian (all-reduce).
    assert "reduce_scatter" in jac[0]["upgrad_ops"]
    assert "reduce_scatter" not in jac[0]["config_ops"]
    for name in ("upgrad", "config"):
        assert _rel(jac[0][name], jac[0][f"{name}_ref"]) <= 1e-9, name
        assert _bitwise(jac[0][name], jac[1][name]), name


def test_three_ranks() -> None:
    names = ["mtl_ddp_adam", "per_sample_uneven", "multitask_engine", "generalized_bk",
             "local_mode", "fsdp2_layerwise", "fsdp2_jacobian", "off_diverges",
             "errors"]  # fmt: skip
    results = _harness.run(3, MODULE, names)
    _check_exact(results, 3)
    _check_errors(results, 3)
    jac = _ok(results, "fsdp2_jacobian")
    assert _rel(jac[0]["upgrad"], jac[0]["upgrad_ref"]) <= 1e-9
    assert _bitwise(jac[0]["upgrad"], jac[2]["upgrad"])


def _check_compiled(results: list[dict]) -> None:
    """The JD part compiled (fullgraph, with its collectives) equals eager; one graph over 10
    steps, no break, no recompilation."""
    per_rank = _ok(results, "compiled")
    for r in per_rank:
        assert r["layerwise_frames"] == 1 and r["layerwise_breaks"] == 0
        assert _rel(r["layerwise_compiled"], r["layerwise_eager"]) <= 1e-9
    assert _bitwise(per_rank[0]["layerwise_compiled"], per_rank[1]["layerwise_compiled"])


# ---------------------------------------------------------------- single process


def test_single_process_costs_nothing() -> None:
    assert not dist.is_initialized()
    model = torch.nn.Linear(3, 2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MeanWeighting())
    opt.step(((model(torch.randn(4, 3)) - 1) ** 2).mean(0))
    assert opt.communicator is None
    assert resolve_mode("auto") is None and resolve_mode("off") is None


def test_modes_are_checked() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="`distributed` should be one of"):
        JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting(),
                    distributed="everywhere")  # type: ignore[arg-type]  # fmt: skip
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting(),
                      distributed="global")  # fmt: skip
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        opt.step(((model(torch.randn(4, 3)) - 1) ** 2).mean(0))
    assert model.weight.grad is None


def test_unsupported_wrappers() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.ds_id = 0  # what DeepSpeed ZeRO puts on its parameters
    with pytest.raises(TypeError, match="DeepSpeed"):
        check_supported([p])
    with pytest.raises(TypeError, match="DeepSpeed"):
        JDOptimizer(torch.optim.SGD([p], lr=0.1), UPGradWeighting())
    # distributed="off" does not look.
    JDOptimizer(torch.optim.SGD([p], lr=0.1), UPGradWeighting(), distributed="off")


def test_batch_slice() -> None:
    t = torch.arange(12).reshape(2, 6)
    assert torch.equal(batch_slice(t, 1, [2, 4], 1), t[:, 2:])
