"""Preference vectors: ``None`` selects a class default, a 1-D tensor selects constant weights."""

from __future__ import annotations

from torch import Tensor

from ._base import Weighting
from .constant import ConstantWeighting


def pref_vector_to_weighting(pref_vector: Tensor | None, default: Weighting) -> Weighting:
    """Return ``default`` for ``None``, else ``ConstantWeighting(pref_vector)`` (1-D only)."""
    if pref_vector is None:
        return default
    if not isinstance(pref_vector, Tensor) or pref_vector.ndim != 1:
        ndim = pref_vector.ndim if isinstance(pref_vector, Tensor) else "not a tensor"
        raise ValueError(
            "Parameter `pref_vector` must be a vector (1D Tensor). Found `pref_vector.ndim = "
            f"{ndim}`."
        )
    return ConstantWeighting(pref_vector)
