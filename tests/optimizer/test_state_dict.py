"""JDOptimizer checkpoints: the standard state-dict format, old formats, atomic loading,
torch.distributed.checkpoint, deepcopy and pickle."""

from __future__ import annotations

import copy
import io
import pickle
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import STCHWeighting
from jdoptim.gramian import MultiTaskGramianEngine

from ._helpers import CountingWeighting, InverseNormWeighting, data, mlp, task_losses

DATA = Path(__file__).resolve().parent.parent / "data"
INNER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def make(inner="adam", weighting=None, seed=0):
    model = mlp(seed)
    weighting = STCHWeighting(warmup_steps=2) if weighting is None else weighting
    return model, JDOptimizer(INNER[inner](model.parameters()), weighting)


def train(model, opt, steps):
    for s in steps:
        opt.zero_grad()
        opt.step(task_losses(model, *data(seed=s)))


def saved(opt) -> dict:
    """What a checkpoint holds (the state dict shares tensors with the live state)."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def assert_equal_trees(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_equal_trees(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal_trees(x, y)
    else:
        assert a == b


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# -- format ---------------------------------------------------------------------------------------


def test_state_and_param_groups_are_the_inner_optimizers():
    model, opt = make()
    train(model, opt, range(3))
    sd = opt.state_dict()
    inner = opt.optimizer.state_dict()
    assert set(sd) == {"state", "param_groups", "jdoptim"}
    assert_equal_trees(sd["state"], inner["state"])
    assert_equal_trees(sd["param_groups"], inner["param_groups"])
    extras = sd["jdoptim"]
    assert extras["version"] == 2 and extras["skipped_steps"] == 0
    assert int(extras["weighting"]["step"]) == 3 and bool(extras["weighting"]["has_nadir"])
    # A tool that only knows torch optimizers loads the standard part into a plain one.
    plain = torch.optim.Adam(mlp().parameters(), lr=0.01)
    plain.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    assert_equal_trees(plain.state_dict(), inner)


@pytest.mark.parametrize("inner", sorted(INNER))
def test_resume_matches_an_uninterrupted_run(inner):
    ref_model, ref_opt = make(inner)
    train(ref_model, ref_opt, range(7))
    model, opt = make(inner)
    train(model, opt, range(3))
    checkpoint = saved(opt)
    model_state = copy.deepcopy(model.state_dict())
    model, opt = make(inner, seed=5)
    model.load_state_dict(model_state)
    opt.load_state_dict(checkpoint)
    assert int(opt.weighting.step) == 3
    train(model, opt, range(3, 7))
    assert_same_params(model, ref_model)


def test_skipped_steps_round_trip():
    model, opt = make(weighting=InverseNormWeighting())
    opt.nonfinite = "skip"
    opt.zero_grad()
    opt.step(task_losses(model, *data()) * float("nan"))
    assert opt.skipped_steps == 1
    _, fresh = make(weighting=InverseNormWeighting())
    fresh.load_state_dict(saved(opt))
    assert fresh.skipped_steps == 1


def test_state_dict_and_load_state_dict_hooks_run():
    model, opt = make()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def post(o, sd):
        calls.append("post")
        return {**sd, "extra": 1}

    opt.register_state_dict_post_hook(post)

    def load_pre(o, sd):
        calls.append("load_pre")
        return {k: v for k, v in sd.items() if k != "extra"}

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "load_pre", "load_post"]


# -- other formats --------------------------------------------------------------------------------


def test_a_plain_inner_state_dict_loads_and_the_weighting_starts_fresh():
    """Migrating a run: the inner optimizer's state carries over, the weighting is reset."""
    torch.manual_seed(0)
    model = mlp()
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    for s in range(3):
        plain.zero_grad()
        task_losses(model, *data(seed=s)).sum().backward()
        plain.step()
    model_state = copy.deepcopy(model.state_dict())
    plain_state = copy.deepcopy(plain.state_dict())

    jd_model, jd = make(seed=1)
    train(jd_model, jd, range(4))  # a warmed-up weighting, which the load must reset
    jd.nonfinite = "skip"
    jd.step(task_losses(jd_model, *data()) * float("nan"))
    assert int(jd.weighting.step) == 4 and jd.skipped_steps == 1
    jd_model.load_state_dict(model_state)
    jd.load_state_dict(copy.deepcopy(plain_state))  # torch's load shares the `step` tensors
    assert_equal_trees(jd.optimizer.state_dict(), plain_state)
    assert int(jd.weighting.step) == 0 and not bool(jd.weighting.has_nadir)
    assert jd.skipped_steps == 0

    # The same as a JDOptimizer built on the migrated Adam.
    ref_model, ref = make(seed=2)
    ref_model.load_state_dict(model_state)
    ref.optimizer.load_state_dict(copy.deepcopy(plain_state))
    jd.nonfinite = "raise"
    train(jd_model, jd, range(3, 7))
    train(ref_model, ref, range(3, 7))
    assert_same_params(jd_model, ref_model)


def test_a_jdoptim_0_1_0_checkpoint_loads_and_resumes():
    fixture = torch.load(DATA / "checkpoint_0_1_0.pt")
    assert set(fixture["optimizer"]) == {"optimizer", "weighting", "skipped_steps"}
    script = runpy.run_path(str(DATA / "make_checkpoint_0_1_0.py"))  # build/train, not main
    model, opt = script["build"]()
    model.load_state_dict(fixture["model"])
    opt.load_state_dict(fixture["optimizer"])
    assert_equal_trees(opt.optimizer.state_dict(), fixture["optimizer"]["optimizer"])
    assert_equal_trees(dict(opt.weighting.state_dict()), dict(fixture["optimizer"]["weighting"]))
    assert int(opt.weighting.step) == 5 and bool(opt.weighting.has_nadir)
    script["train"](model, opt, range(5, 8))
    # Made on another machine: equal up to the float order of its BLAS.
    for p, q in zip(model.parameters(), fixture["params_after_8_steps"], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    # And it saves in the current format.
    assert set(opt.state_dict()) == {"state", "param_groups", "jdoptim"}


# -- atomic loading -------------------------------------------------------------------------------


def _bad_state_dicts():
    """(name, edit of a valid new-format state dict, expected exception)."""

    def extras(fn):
        def edit(sd):
            fn(sd["jdoptim"])
            return sd

        return edit

    def weighting(fn):
        return extras(lambda e: fn(e["weighting"]))

    def legacy(fn):
        def edit(sd):
            inner = {k: v for k, v in sd.items() if k != "jdoptim"}
            old = {"optimizer": inner, **{k: sd["jdoptim"][k] for k in ("weighting",)}}
            fn(old)
            return old

        return edit

    return [
        ("no extras weighting", extras(lambda e: e.pop("weighting")), ValueError),
        ("no skipped_steps", extras(lambda e: e.pop("skipped_steps")), ValueError),
        ("negative skipped_steps", extras(lambda e: e.update(skipped_steps=-1)), ValueError),
        ("newer version", extras(lambda e: e.update(version=99)), ValueError),
        ("extras not a dict", lambda sd: {**sd, "jdoptim": 3}, TypeError),
        ("missing buffer", weighting(lambda w: w.pop("has_nadir")), ValueError),
        ("unexpected buffer", weighting(lambda w: w.update(other=torch.ones(1))), ValueError),
        ("bad buffer shape", weighting(lambda w: w.update(step=torch.zeros(2))), ValueError),
        ("legacy without weighting", legacy(lambda old: old.pop("weighting")), ValueError),
        ("legacy bad weighting", legacy(lambda old: old["weighting"].pop("step")), ValueError),
        (
            "no param_groups",
            lambda sd: {k: v for k, v in sd.items() if k != "param_groups"},
            ValueError,
        ),
        ("no state", lambda sd: {k: v for k, v in sd.items() if k != "state"}, ValueError),
        ("extra group", lambda sd: {**sd, "param_groups": sd["param_groups"] * 2}, ValueError),
        (
            "short group",
            lambda sd: {
                **sd,
                "param_groups": [
                    {**sd["param_groups"][0], "params": sd["param_groups"][0]["params"][:-1]}
                ],
            },
            ValueError,
        ),
        ("not a mapping", lambda sd: [sd], TypeError),
    ]


BAD = _bad_state_dicts()


@pytest.mark.parametrize(("edit", "error"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_refused_state_dict_changes_nothing(edit, error):
    # The source differs from the target in every part: other lr, Adam moments, weighting
    # state, counters; a partial load would show.
    source_model, source = make(seed=3)
    source.param_groups[0]["lr"] = 0.5
    train(source_model, source, range(5))
    source.nonfinite = "skip"
    source.step(task_losses(source_model, *data()) * float("nan"))
    bad = edit(saved(source))

    model, opt = make()
    train(model, opt, range(2))
    before = saved(opt)
    with pytest.raises(error):
        opt.load_state_dict(bad)
    assert_equal_trees(saved(opt), before)
    train(model, opt, range(2, 3))  # and it still works


def test_a_refused_weighting_state_names_the_weighting():
    _, source = make()
    sd = saved(source)
    sd["jdoptim"]["weighting"].pop("step")
    _, opt = make()
    with pytest.raises(ValueError, match="STCHWeighting"):
        opt.load_state_dict(sd)


# -- torch.distributed.checkpoint -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_save_and_load(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # A stateful weighting: DCP carries the inner optimizer's part, the "jdoptim" entry goes
    # next to it (the documented recipe).
    ref_model, ref_opt = make()
    train(ref_model, ref_opt, range(6))

    model, opt = make()
    train(model, opt, range(3))
    optim_state = get_optimizer_state_dict(model, opt)
    assert set(optim_state) == {"state", "param_groups"}
    assert set(optim_state["state"]) == {name for name, _ in model.named_parameters()}
    dcp.save(
        {"model": get_model_state_dict(model), "optim": optim_state},
        checkpoint_id=str(tmp_path),
        no_dist=True,
    )
    torch.save(opt.state_dict()["jdoptim"], tmp_path / "jdoptim.pt")

    model, opt = make(seed=7)
    train(model, opt, range(1))  # some weighting state, which the DCP load resets
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert int(opt.weighting.step) == 0
    opt.load_state_dict(
        {**opt.optimizer.state_dict(), "jdoptim": torch.load(tmp_path / "jdoptim.pt")}
    )
    assert int(opt.weighting.step) == 3
    train(model, opt, range(3, 6))
    assert_same_params(model, ref_model)


# -- deepcopy and pickle --------------------------------------------------------------------------


def _pickle_round_trip(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("copier", [copy.deepcopy, _pickle_round_trip], ids=["deepcopy", "pickle"])
def test_a_copy_is_independent_and_steps_like_the_original(inner, copier):
    model, opt = make(inner)
    train(model, opt, range(3))
    copy_model, copy_opt = copier((model, opt))
    assert isinstance(copy_opt, JDOptimizer) and copy_opt.optimizer is not opt.optimizer
    assert copy_opt.weighting is not opt.weighting
    copy_params = list(copy_model.parameters())
    assert all(any(p is q for q in copy_params) for g in copy_opt.param_groups for p in g["params"])
    before = saved(opt)
    train(copy_model, copy_opt, range(3, 5))  # the copy steps; the original does not move
    assert_equal_trees(saved(opt), before)
    train(model, opt, range(3, 5))
    assert_same_params(model, copy_model)
    assert_equal_trees(saved(opt), saved(copy_opt))


def test_deepcopy_of_the_optimizer_alone_steps_its_own_parameters():
    model, opt = make("sgd", weighting=CountingWeighting())
    train(model, opt, range(2))
    twin = copy.deepcopy(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(p is not q and torch.equal(p, q) for p, q in zip(params, twin_params, strict=True))
    for ps in (params, twin_params):
        for i, p in enumerate(ps):
            p.grad = torch.full_like(p, 0.1 * (i + 1))
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
    assert twin.state_dict()["jdoptim"]["weighting"]["calls"] == 2


def _hooked(engine: str):
    """A model, a JDOptimizer whose engine hooks it, and the model's losses."""
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 6), nn.ModuleList([nn.Linear(6, 1) for _ in range(2)])
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    x = torch.randn(5, 4, dtype=torch.float64)
    model.double()

    def losses(model):
        h = torch.tanh(model["trunk"](x))
        out = torch.cat([head(h) for head in model["heads"]], dim=1)
        return (out - 1.0) ** 2 if engine == "layerwise" else ((out - 1.0) ** 2).mean(0)

    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if engine == "layerwise":
        opt = JDOptimizer(inner, InverseNormWeighting(), model=model, batch_dim=0)
    else:
        multitask = MultiTaskGramianEngine(model["trunk"], model["heads"])
        opt = JDOptimizer(inner, InverseNormWeighting(), engine=multitask)
    return model, opt, losses


def _records(engine) -> int:
    """What the engine's hooks stored since its last compute (layer-wise or multi-task)."""
    return len(getattr(engine, "_records", [])) + len(getattr(engine, "_trunk_calls", []))


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickle_round_trip], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("engine", ["layerwise", "multitask"])
def test_a_copy_with_a_hook_based_engine_steps_its_own_model(engine, copier):
    model, opt, losses = _hooked(engine)
    for _ in range(2):
        opt.zero_grad()
        opt.step(losses(model))
    copy_model, copy_opt = copier((model, opt))
    assert copy_opt.engine is not opt.engine
    # The copied model's forward passes record into the copy's engine, never the original's.
    losses(copy_model)
    assert _records(opt.engine) == 0 and _records(copy_opt.engine) > 0
    copy_opt.engine.reset()
    for _ in range(3):  # original and copy, trained alike, stay bit-identical
        for m, o in ((model, opt), (copy_model, copy_opt)):
            o.zero_grad()
            o.step(losses(m))
    assert_same_params(model, copy_model)
    assert all(p.grad is not None for p in copy_model.parameters())


@pytest.mark.parametrize("engine", ["layerwise", "multitask"])
def test_a_hooked_model_can_be_saved_and_copied_alone(engine):
    """torch.save(model) and an EMA-style deepcopy(model) of a model an engine hooks: the copy
    carries inert hooks (they record nothing into the original engine)."""
    model, opt, losses = _hooked(engine)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ema = copy.deepcopy(model)
    losses(loaded), losses(ema)
    assert _records(opt.engine) == 0
    opt.zero_grad()
    opt.step(losses(model))  # the original still trains
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickle_round_trip], ids=["deepcopy", "pickle"])
def test_a_copy_keeps_partial_jd(copier):
    """`params=` (partial JD) names parameters of the original: the copy must name its own."""
    model = mlp()
    trunk = list(model[0].parameters())
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        InverseNormWeighting(),
        params=trunk,
        other_params_grad="sum",
    )
    copy_model, copy_opt = copier((model, opt))
    train(model, opt, range(2))
    train(copy_model, copy_opt, range(2))
    assert_same_params(model, copy_model)
    assert copy_opt._split_params()[0] == list(copy_model[0].parameters())


def test_changing_the_weighting_loads_without_the_jd_entry():
    model, opt = make()
    train(model, opt, range(3))
    sd = saved(opt)
    _, other = make(weighting=InverseNormWeighting())
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict(sd)  # STCH's buffers do not fit InverseNormWeighting
    other.load_state_dict({k: v for k, v in sd.items() if k != "jdoptim"})
    assert_equal_trees(other.optimizer.state_dict()["state"], sd["state"])


@pytest.mark.parametrize("custom_group", [False, True], ids=["default-group", "custom-group"])
def test_a_copy_in_a_distributed_run(custom_group):
    """The distributed step's communicator holds a process group: a copy sets up its own, and
    shares a given group (one gloo rank, in this process)."""
    pytest.importorskip("jdoptim.distributed")  # the distributed step (jdoptim >= 0.2)
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not initialised yet")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        group = dist.new_group([0]) if custom_group else None
        model = mlp()
        opt = JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            InverseNormWeighting(),
            distributed="global",
            process_group=group,
        )
        train(model, opt, range(1))
        assert opt.communicator is not None
        copies = [copy.deepcopy((model, opt))]
        if not custom_group:  # a ProcessGroup cannot be pickled (torch)
            copies.append(_pickle_round_trip((model, opt)))
        for copy_model, copy_opt in copies:
            assert copy_opt.process_group is group
            train(copy_model, copy_opt, range(1, 3))
            assert copy_opt.communicator is not None
        train(model, opt, range(1, 3))
        for copy_model, _ in copies:
            assert_same_params(model, copy_model)
    finally:
        dist.destroy_process_group()
