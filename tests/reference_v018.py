"""Loading of torchjd 0.18's reference values (tests/data/reference_values_v018.json).

Comparison rule of the spec: ``|x - ref| <= tol * max(|ref|, 1)`` with tol 5e-5 (float32),
1e-6 (float64) and 1e-3 for float32 records flagged ``fragile``; an ``unstable`` float32
record (another branch than its float64 twin) may match either.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "reference_values_v018.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@cache
def load() -> dict:
    return json.loads(DATA.read_text())


def records(family: str, methods: set[str] | None = None) -> list[dict]:
    return [
        r
        for r in load()["results"]
        if r["family"] == family and (methods is None or r["method"] in methods)
    ]


def record_id(r: dict) -> str:
    return f"{r['id']}|{r['kind']}|{r['ctor']}|{r.get('input')}|{r['dtype']}"


def build(ctor: str, dtype: torch.dtype, module: object):
    namespace = {name: getattr(module, name) for name in module.__all__}
    namespace["tensor"] = lambda data: torch.tensor(data, dtype=dtype)
    namespace["torch"] = torch
    return eval(ctor, namespace)  # noqa: S307 - trusted test data


def input_tensor(name: str, dtype: torch.dtype) -> torch.Tensor:
    inputs = load()["inputs"]
    if name.startswith("edge:"):
        key = name.removeprefix("edge:")
        expr = inputs["edge_matrices"].get(key) or inputs["edge_values"][key]
        t = eval(expr, {"torch": torch, "tensor": torch.tensor})  # noqa: S307
        return t.to(dtype)
    return torch.tensor(inputs["exact_float32_values"][name], dtype=torch.float32).to(dtype)


def statistic(applied_to: str, x: torch.Tensor) -> torch.Tensor:
    if applied_to == "J @ J.T":
        return x @ x.T
    if applied_to == "J @ J.roll(1, dims=1).T":
        return x @ x.roll(1, dims=1).T
    return x


def _number(x) -> float:
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(x, x)


def expected(values) -> torch.Tensor:
    if isinstance(values, list):
        return torch.tensor(_nested(values), dtype=torch.float64)
    return torch.tensor(_number(values), dtype=torch.float64)


def _nested(values):
    return [_nested(v) if isinstance(v, list) else _number(v) for v in values]


def tolerance(r: dict) -> float:
    if r["dtype"] == "float64":
        return 1e-6
    return 1e-3 if r.get("fragile") else 5e-5


def close(actual: torch.Tensor | None, ref, tol: float) -> bool:
    if actual is None or ref is None:
        return actual is None and ref is None
    exp = expected(ref)
    act = actual.detach().to(torch.float64).reshape(exp.shape)
    both_nan = exp.isnan() & act.isnan()
    same_inf = exp.isinf() & (act == exp)
    ok = (act - exp).abs() <= tol * exp.abs().clamp(min=1.0)
    return bool((both_nan | same_inf | ok).all())


def float64_twin(r: dict) -> dict | None:
    for other in load()["results"]:
        if (
            other["dtype"] == "float64"
            and other["family"] == r["family"]
            and other["kind"] == r["kind"]
            and other["ctor"] == r["ctor"]
            and other.get("input") == r.get("input")
            and other.get("applied_to") == r.get("applied_to")
        ):
            return other
    return None


def error_type(error: str) -> str:
    return error.split(":", 1)[0]
