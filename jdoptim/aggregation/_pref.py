"""Preference vectors: ``None`` selects a class default, a 1-D tensor selects constant weights."""

from __future__ import annotations

from torch import Tensor

from ._base import Param, Weighting
from .constant import ConstantWeighting


def check_pref_vector(pref_vector: Tensor | None) -> Tensor | None:
    """Return ``pref_vector`` if it is ``None`` or a 1-D tensor, else raise ``ValueError``."""
    if pref_vector is not None and (not isinstance(pref_vector, Tensor) or pref_vector.ndim != 1):
        ndim = pref_vector.ndim if isinstance(pref_vector, Tensor) else "not a tensor"
        raise ValueError(
            "Parameter `pref_vector` must be a vector (1D Tensor). Found `pref_vector.ndim = "
            f"{ndim}`."
        )
    return pref_vector


def pref_vector_to_weighting(pref_vector: Tensor | None, default: Weighting) -> Weighting:
    """Return ``default`` for ``None``, else ``ConstantWeighting(pref_vector)`` (1-D only)."""
    if check_pref_vector(pref_vector) is None:
        return default
    return ConstantWeighting(pref_vector)


def pref_vector_param(default: type[Weighting]) -> Param:
    """A :class:`~jdoptim.aggregation._base.Param` ``pref_vector`` whose setter also rebuilds
    ``self.weighting`` (``default()`` for ``None``, constant weights otherwise)."""

    def rebuild(obj: Weighting, pref_vector: Tensor | None) -> None:
        obj.weighting = pref_vector_to_weighting(pref_vector, default=default())

    return Param(check_pref_vector, on_set=rebuild)
