"""Run the solvers' fixed-length loops as one compiled kernel even when called eagerly.

Op-by-op eager execution of a solver loop costs a few microseconds of dispatch per element-wise
op, dozens of ops per iteration: at the sizes of Jacobian descent (m up to a few hundred) that,
not the arithmetic, is most of the time. :func:`eager_compiled` wraps a solver so that, outside
a compiled region, it runs through a cached ``torch.compile(fullgraph=True)`` of itself (sizes
become dynamic after the first change, so a new m costs one more compilation at most). Inside a
user's compiled region the solver is traced into the user's graph as usual.

On by default; ``JDOPTIM_COMPILE_SOLVERS=0`` or :func:`set_eager_compilation` turns it off. If
compiling a solver fails (e.g. no C++ compiler, or its recompilation limit is reached), a
warning is issued once and that solver runs its plain function from then on; the others keep
their compiled kernels.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])

_state = {"enabled": os.environ.get("JDOPTIM_COMPILE_SOLVERS", "1") != "0"}
_cache: dict[Callable[..., object], Callable[..., object]] = {}
_failed: set[Callable[..., object]] = set()  # solvers whose compilation failed: plain from then on


def set_eager_compilation(enabled: bool) -> None:
    """Choose whether eager calls of jdoptim's solvers run a compiled kernel (default: yes).
    Turning it on also retries the solvers whose compilation failed.

    >>> set_eager_compilation(True)
    """
    _state["enabled"] = bool(enabled)
    if enabled:
        _failed.clear()


def eager_compilation_enabled() -> bool:
    """Whether eager solver calls currently run compiled kernels."""
    return _state["enabled"]


def eager_compiled(fn: F) -> F:
    """Decorate a pure tensor function (no autograd needed through it) as described above."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        if torch.compiler.is_compiling() or not _state["enabled"] or fn in _failed:
            return fn(*args, **kwargs)
        compiled = _cache.get(fn)
        if compiled is None:
            compiled = _cache[fn] = torch.compile(fn, fullgraph=True)
        try:
            return compiled(*args, **kwargs)
        except Exception as error:  # compilation infrastructure only: inputs are validated
            warnings.warn(
                f"jdoptim could not compile {fn.__name__} ({type(error).__name__}: {error}); "
                "falling back to eager execution (slower). Call "
                "jdoptim.solvers.set_eager_compilation(False) to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
            _failed.add(fn)
            return fn(*args, **kwargs)

    wrapper.plain = fn  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
