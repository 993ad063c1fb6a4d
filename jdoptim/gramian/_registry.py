"""Engine names: ``"jacobian"``, ``"auto"``, and any registered later."""

from __future__ import annotations

from collections.abc import Callable

from ._base import GramianEngine
from .jacobian import JacobianEngine

EngineFactory = Callable[..., GramianEngine]

_ENGINES: dict[str, EngineFactory] = {"jacobian": JacobianEngine}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Make ``engine=name`` build ``factory(chunk_size=...)``.

    >>> register_engine("jacobian", JacobianEngine)
    """
    if name == "auto":
        raise ValueError('"auto" is reserved: it picks among the registered engines.')
    _ENGINES[name] = factory


def available_engines() -> tuple[str, ...]:
    """Names accepted by :func:`resolve_engine` (besides ``"auto"``).

    >>> "jacobian" in available_engines()
    True
    """
    return tuple(_ENGINES)


def resolve_engine(
    engine: str | GramianEngine, *, chunk_size: int | None = None, needs_jacobian: bool = False
) -> GramianEngine:
    """Return an engine instance for a name or pass an instance through.

    ``"auto"`` picks the engine for the job; today that is always the
    :class:`~jdoptim.gramian.JacobianEngine` (layer-wise engines will take over where they
    apply and ``needs_jacobian`` is ``False``).

    >>> resolve_engine("auto", chunk_size=4)
    JacobianEngine(chunk_size=4)
    """
    if isinstance(engine, GramianEngine):
        if needs_jacobian and not engine.materializes_jacobian:
            raise ValueError(
                f"{engine!r} does not materialise the Jacobian, which this aggregator needs."
            )
        return engine
    if engine == "auto":
        return JacobianEngine(chunk_size=chunk_size)
    if engine not in _ENGINES:
        raise ValueError(
            f"Unknown engine {engine!r}; expected 'auto', one of {available_engines()} or a "
            "GramianEngine instance."
        )
    built = _ENGINES[engine](chunk_size=chunk_size)
    return resolve_engine(built, needs_jacobian=needs_jacobian)
