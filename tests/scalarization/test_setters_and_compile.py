"""Scalarizer parameters are validated properties used from the next call; the stateful
scalarizers compile whole and follow eager; ``shape`` is fixed (read-only)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch._dynamo

import jdoptim.scalarization as sc

W = torch.tensor([0.2, 0.3, 0.5])
V = torch.tensor([0.5, 1.2, 2.0])

# (class, base kwargs, parameter, new value, invalid value or None)
CASES = [
    (sc.Constant, {"weights": W}, "weights", 2 * W, None),
    (sc.COSMOS, {"lambda_": 1.0, "weights": W}, "lambda_", 8.0, -1.0),
    (sc.COSMOS, {"lambda_": 1.0, "weights": W}, "weights", 2 * W, None),
    (sc.PBI, {"theta": 5.0, "weights": W}, "theta", 1.0, -1.0),
    (sc.PBI, {"theta": 5.0, "weights": W}, "weights", 2 * W, None),
    (sc.PBI, {"theta": 5.0, "weights": W}, "reference", 0.1 * W, None),
    (sc.STCH, {"mu": 1.0}, "mu", 0.1, 0.0),
    (sc.STCH, {"mu": 1.0}, "weights", W, None),
    (sc.STCH, {"mu": 1.0}, "reference", 0.1 * W, None),
    (sc.DWA, {}, "temperature", 0.5, 0.0),
    (sc.FAMO, {"shape": 3}, "lr", 0.5, -0.1),
    (sc.FAMO, {"shape": 3}, "weight_decay", 0.0, -0.1),
    (sc.FAMO, {"shape": 3}, "min_losses", 0.1 * W, torch.zeros(2)),
]
FIXED = {(sc.FAMO, "shape"), (sc.UW, "shape"), (sc.IMTLL, "shape")}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}.{c[2]}")
def test_setter(case) -> None:
    cls, base, name, new, bad = case
    obj = cls(**base)
    setattr(obj, name, new)
    fresh = cls(**{**base, name: new})
    assert _same(getattr(obj, name), new)
    assert repr(obj) == repr(fresh)
    if cls is sc.FAMO:  # FAMO's lr/weight_decay are read when its Adam starts: update once
        for o in (obj, fresh):
            o(V)
            o.update(0.9 * V)
        torch.testing.assert_close(obj.logits, fresh.logits, rtol=0, atol=0)
    torch.testing.assert_close(obj(V), fresh(V), rtol=0, atol=0)
    if bad is not None:
        with pytest.raises(ValueError) as at_construction:
            cls(**{**base, name: bad})
        with pytest.raises(ValueError) as at_setter:
            setattr(obj, name, bad)
        assert str(at_setter.value) == str(at_construction.value)
        assert _same(getattr(obj, name), new)


def test_every_constructor_parameter_has_a_case() -> None:
    covered = {(c[0], c[2]) for c in CASES} | FIXED
    for name in sc.__all__:
        cls = getattr(sc, name)
        if inspect.isabstract(cls):
            continue
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            assert (cls, p.name) in covered, f"{name}.{p.name}"
    with pytest.raises(AttributeError):
        sc.UW(3).shape = (2,)


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
def test_famo_compiles_and_follows_eager() -> None:
    eager, compiled_obj = sc.FAMO(3), sc.FAMO(3)
    losses = [torch.tensor([0.5, 1.2, 2.0]) * (0.9**k) + 0.01 * k for k in range(4)]

    def step(obj, now, new):
        out = obj(now)
        obj.update(new)
        return out

    eager_out = [step(eager, losses[k], losses[k + 1]) for k in range(3)]
    # The first update (which creates the Adam state) runs eagerly; then compile.
    step(compiled_obj, losses[0], losses[1])
    compiled = torch.compile(lambda a, b: step(compiled_obj, a, b), fullgraph=True)
    outs = [compiled(losses[k], losses[k + 1]) for k in (1, 2)]
    torch.testing.assert_close(outs, eager_out[1:])
    torch.testing.assert_close(compiled_obj.logits, eager.logits)
