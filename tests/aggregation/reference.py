"""Loading of the torchjd reference values (tests/data/reference_values.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

import jdoptim.aggregation as agg

DATA = Path(__file__).resolve().parents[1] / "data" / "reference_values.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@cache
def load() -> dict:
    return json.loads(DATA.read_text())


def records(section: str | None = None) -> list[dict]:
    return [r for r in load()["results"] if section is None or r.get("section") == section]


def make_tensor_fn(dtype: torch.dtype):
    return lambda data: torch.tensor(data, dtype=dtype)


def build(ctor: str, dtype: torch.dtype):
    """Evaluate a constructor expression of the JSON with jdoptim's classes."""
    namespace = {name: getattr(agg, name) for name in agg.__all__}
    namespace["tensor"] = make_tensor_fn(dtype)
    namespace["torch"] = torch
    return eval(ctor, namespace)  # noqa: S307 - trusted test data


def input_matrix(name: str, dtype: torch.dtype) -> torch.Tensor:
    inputs = load()["inputs"]
    if name in inputs["exact_values"]:
        return torch.tensor(inputs["exact_values"][name], dtype=torch.float32).to(dtype)
    expr = inputs["edge_inputs"][name]
    return eval(expr, {"torch": torch, "tensor": torch.tensor}).to(dtype)


def record_id(r: dict) -> str:
    return f"{r['section']}|{r['kind']}|{r['ctor']}|{r.get('input')}|{r['dtype']}"


def float64_twin(r: dict) -> dict | None:
    """The float64 record with the same section, kind, constructor and input as ``r``."""
    for other in load()["results"]:
        if (
            other["dtype"] == "float64"
            and other["section"] == r["section"]
            and other["kind"] == r["kind"]
            and other["ctor"] == r["ctor"]
            and other.get("input") == r.get("input")
        ):
            return other
    return None
