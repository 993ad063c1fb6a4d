"""Input validation shared by every aggregator and weighting.

Shape checks read only static metadata, so they are always on and cost nothing on the GPU and
nothing under ``torch.compile``.

Value checks (finite entries, symmetry of a Gramian) read the data. On a CUDA tensor that is a
host-device synchronisation, so by default (``"auto"``) they run only on CPU tensors, and never
while ``torch.compile`` traces (the compiled graph carries no data-dependent ``raise``). Use
:func:`set_value_checks` to force them on (``"always"``, e.g. while debugging on a GPU) or off
(``"never"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

ValueCheckMode = Literal["auto", "always", "never"]
_MODES = ("auto", "always", "never")
_mode: ValueCheckMode = "auto"

SYMMETRY_RTOL = 1e-4
"""Largest accepted ``max|G - G^T|`` relative to ``max|G|`` for a Gramian."""


def set_value_checks(mode: ValueCheckMode) -> None:
    """Choose when value checks (finiteness, symmetry) run: ``"auto"``, ``"always"``, ``"never"``.

    >>> set_value_checks("never"); set_value_checks("auto")
    """
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, but got {mode!r}.")
    _mode = mode


def get_value_checks() -> ValueCheckMode:
    """Return the current value-check mode."""
    return _mode


@contextmanager
def value_checks(mode: ValueCheckMode) -> Iterator[None]:
    """Context manager that sets the value-check mode and restores the previous one."""
    previous = _mode
    set_value_checks(mode)
    try:
        yield
    finally:
        set_value_checks(previous)


def should_check_values(t: Tensor) -> bool:
    """Whether data-dependent checks may run on ``t`` now (see the module docstring)."""
    if torch.compiler.is_compiling() or _mode == "never":
        return False
    if _mode == "always":
        return True
    return t.device.type == "cpu"


def check_matrix(matrix: Tensor, name: str = "matrix") -> None:
    """Raise ``ValueError`` unless ``matrix`` is a 2-D tensor with at least one row and finite
    entries (the latter only where :func:`should_check_values` allows)."""
    _check_2d(matrix, name)
    check_finite(matrix, name)


def _check_2d(matrix: Tensor, name: str) -> None:
    if not isinstance(matrix, Tensor):
        raise TypeError(f"Parameter `{name}` should be a Tensor. Found `{type(matrix).__name__}`.")
    if matrix.ndim != 2:
        raise ValueError(
            f"Parameter `{name}` should be a tensor of dimension 2. Found `{name}.shape = "
            f"{matrix.shape}`."
        )
    if matrix.shape[0] == 0:
        raise ValueError(
            f"Parameter `{name}` should have at least one row (one objective). Found `{name}.shape"
            f" = {matrix.shape}`."
        )


def check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``t`` has a NaN or infinite entry (when value checks may run)."""
    if not (should_check_values(t) and t.is_floating_point()):
        return
    # The sum is finite when every entry is (one reduction); only a NaN, an inf or an overflow
    # of the sum makes it not, and then the entries are checked one by one.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"Parameter `{name}` has non-finite entries (NaN or inf); refusing to produce a "
            f"meaningless result."
        )


def check_gramian(gramian: Tensor, name: str = "gramian") -> None:
    """Raise ``ValueError`` unless ``gramian`` is a non-empty, square, finite, symmetric matrix."""
    _check_2d(gramian, name)
    if gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"Parameter `{name}` should be a square matrix. Found `{name}.shape = {gramian.shape}`."
        )
    if should_check_values(gramian) and gramian.is_floating_point():
        # Both checks at once: a non-finite entry G_ij makes G_ij - G_ji non-finite, so a finite
        # max|G| and max|G - G^T| <= rtol max|G| mean finite and symmetric; otherwise the entries
        # say which check fails. G - G^T is antisymmetric: its largest entry is its largest |.|.
        # Host reads: validation, on CPU tensors only in the default mode (see the module).
        low, high = torch.aminmax(gramian)
        asym, low, high = (gramian - gramian.mT).amax().item(), low.item(), high.item()
        scale = max(high, -low)
        if not (math.isfinite(scale) and asym <= SYMMETRY_RTOL * scale):
            check_finite(gramian, name)
            raise ValueError(
                f"Parameter `{name}` should be symmetric. Found max|{name} - {name}^T| = "
                f"{asym:.3g} for max|{name}| = {scale:.3g}."
            )
