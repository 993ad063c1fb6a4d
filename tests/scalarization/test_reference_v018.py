"""Every record of torchjd 0.18's reference values for ``torchjd.scalarization``: outputs,
gradients in the losses and in the scalarizer's parameters, parameter values, constructor
errors, and the stateful sequences (DWA ``step()``, FAMO ``update()``, UW/IMTL-L SGD steps on
their parameters, ``reset()``). ``rng_dependent`` records (Random) are reproduced: jdoptim
draws the same ``torch.randn`` as torchjd."""

from __future__ import annotations

import pytest
import torch

import jdoptim.scalarization as sc

from ..reference_v018 import (
    DTYPES,
    build,
    close,
    error_type,
    input_tensor,
    load,
    record_id,
    records,
    tolerance,
)

RECORDS = records("scalarization")


def _call(obj, name: str, dtype: torch.dtype, expected: dict, tol: float) -> list:
    values = input_tensor(name, dtype).requires_grad_(True)
    params = list(obj.parameters())
    out = obj(values)
    assert out.ndim == 0
    assert close(out, expected["output"], tol), (out, expected["output"])
    grads = torch.autograd.grad(out, [values, *params], allow_unused=True)
    assert close(grads[0], expected["grad_values"], tol), (grads[0], expected["grad_values"])
    for actual, ref in zip(grads[1:], expected["param_grads"], strict=True):
        assert close(actual, ref, tol), (actual, ref)
    for p, ref in zip(params, expected["params"], strict=True):
        assert close(p, ref, tol)
    return list(grads[1:])


def _run_sequence(r: dict, dtype: torch.dtype, tol: float) -> None:
    obj = build(r["ctor"], dtype, sc)
    last_grads: list = []
    for op, result in zip(r["ops"], r["results"], strict=False):
        kind = op["op"]
        if result.get("error"):
            with pytest.raises(Exception) as info:
                if kind == "call":
                    obj(input_tensor(op["input"], dtype))
                elif kind == "update":
                    obj.update(input_tensor(op["input"], dtype))
                else:
                    raise AssertionError(kind)
            assert type(info.value).__name__ == error_type(result["error"])
            return
        if kind == "call":
            last_grads = _call(obj, op["input"], dtype, result, tol)
        elif kind == "update":
            obj.update(input_tensor(op["input"], dtype))
        elif kind == "step":
            obj.step()
        elif kind == "reset":
            obj.reset()
        elif kind == "seed":
            torch.manual_seed(0)
        elif kind == "sgd":
            with torch.no_grad():
                for p, g in zip(obj.parameters(), last_grads, strict=True):
                    p -= op["lr"] * g
            for p, ref in zip(obj.parameters(), result["params"], strict=True):
                assert close(p, ref, tol)


@pytest.mark.parametrize("r", RECORDS, ids=record_id)
def test_record(r: dict) -> None:
    dtype = DTYPES[r["dtype"]]
    tol = tolerance(r)
    if r.get("rng_dependent"):
        torch.manual_seed(0)
    if r["kind"] == "ctor_error":
        with pytest.raises(Exception) as info:
            build(r["ctor"], dtype, sc)
        assert type(info.value).__name__ == error_type(r["error"])
        assert str(info.value) == r["error"].split(": ", 1)[1]
    elif r["kind"] == "ctor_ok":
        build(r["ctor"], dtype, sc)
    elif r["kind"] == "call":
        obj = build(r["ctor"], dtype, sc)
        if r.get("error"):
            with pytest.raises(Exception) as info:
                obj(input_tensor(r["input"], dtype))
            assert type(info.value).__name__ == error_type(r["error"])
            assert str(info.value) == r["error"].split(": ", 1)[1]
        else:
            _call(obj, r["input"], dtype, r, tol)
    else:
        _run_sequence(r, dtype, tol)


REPRS = [k for k in load()["reprs"] if k.startswith("scalarization:")]


@pytest.mark.parametrize("key", REPRS)
def test_repr_and_str(key: str) -> None:
    obj = build(key.removeprefix("scalarization:"), torch.float32, sc)
    assert repr(obj) == load()["reprs"][key]["repr"]
    assert str(obj) == load()["reprs"][key]["str"]
