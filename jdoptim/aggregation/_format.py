"""String formatting helpers for ``__str__`` of aggregators."""

from __future__ import annotations

from torch import Tensor


def vector_to_str(vector: Tensor) -> str:
    """Format a vector as ``[1., 0.5, 0.12]``: two decimals, trailing zeros stripped.

    >>> import torch
    >>> vector_to_str(torch.tensor([1.0, 2.0, 0.125, 0.5]))
    '[1., 2., 0.12, 0.5]'
    """
    return "[" + ", ".join(f"{float(x):.2f}".rstrip("0") for x in vector) + "]"


def pref_vector_to_str_suffix(pref_vector: Tensor | None) -> str:
    """Return ``""`` for no preference vector, else ``"(" + vector_to_str(...) + ")"``."""
    if pref_vector is None:
        return ""
    return "(" + vector_to_str(pref_vector) + ")"
