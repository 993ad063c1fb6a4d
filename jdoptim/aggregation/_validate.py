"""Parameter checks with torchjd 0.18's messages (``Attribute `name` must be ...``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def positive(name: str) -> Callable[[Any], Any]:
    """Reject ``value <= 0`` (NaN passes, as in torchjd)."""

    def check(value: Any) -> Any:
        if value <= 0:
            raise ValueError(f"Attribute `{name}` must be positive. Found {name}={value!r}.")
        return value

    return check


def non_negative(name: str) -> Callable[[Any], Any]:
    """Reject ``value < 0`` (NaN passes, as in torchjd)."""

    def check(value: Any) -> Any:
        if value < 0:
            raise ValueError(f"Attribute `{name}` must be non-negative. Found {name}={value!r}.")
        return value

    return check


def in_unit_interval(name: str, *, closed: bool = True) -> Callable[[Any], Any]:
    """Reject values outside ``[0, 1]`` (or ``[0, 1)``); NaN is rejected."""
    interval = "[0, 1]" if closed else "[0, 1)"

    def check(value: Any) -> Any:
        ok = 0 <= value <= 1 if closed else 0 <= value < 1
        if not ok:
            raise ValueError(f"Attribute `{name}` must be in {interval}. Found {name}={value!r}.")
        return value

    return check


def positive_int(name: str) -> Callable[[Any], Any]:
    """Reject ``value < 1``."""

    def check(value: Any) -> Any:
        if value < 1:
            raise ValueError(
                f"Attribute `{name}` must be a positive integer. Found {name}={value!r}."
            )
        return value

    return check
