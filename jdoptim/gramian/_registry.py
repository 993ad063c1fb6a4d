"""Engine names: ``"jacobian"``, ``"auto"``, and any registered later."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ._base import GramianEngine
from .jacobian import JacobianEngine
from .layerwise import LayerwiseGramianEngine

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

    >>> {"jacobian", "layerwise"} <= set(available_engines())
    True
    """
    return (*_ENGINES, "layerwise")


def resolve_engine(
    engine: str | GramianEngine,
    *,
    chunk_size: int | None = None,
    needs_jacobian: bool = False,
    model: nn.Module | None = None,
    batch_dim: int | None = None,
) -> GramianEngine:
    """Return an engine instance for a name or pass an instance through.

    ``"auto"`` picks the engine for the job: the
    :class:`~jdoptim.gramian.LayerwiseGramianEngine` when the losses are per-sample (a
    ``batch_dim`` is given), the ``model`` to hook is known and the aggregator does not need the
    materialised Jacobian; the :class:`~jdoptim.gramian.JacobianEngine` otherwise.
    ``"layerwise"`` asks for the layer-wise engine explicitly (``model`` required; ``batch_dim``
    defaults to 0).

    >>> resolve_engine("auto", chunk_size=4)
    JacobianEngine(chunk_size=4)
    >>> resolve_engine("auto", model=nn.Linear(2, 3), batch_dim=0)
    LayerwiseGramianEngine(batch_dim=0, strategy='auto', clone_outputs=False)
    """
    if isinstance(engine, GramianEngine):
        if needs_jacobian and not engine.materializes_jacobian:
            raise ValueError(
                f"{engine!r} does not materialise the Jacobian, which this aggregator needs."
            )
        return engine
    if engine == "auto":
        if batch_dim is not None and model is not None and not needs_jacobian:
            return LayerwiseGramianEngine(model, batch_dim=batch_dim, chunk_size=chunk_size)
        return JacobianEngine(chunk_size=chunk_size)
    if engine == "layerwise":
        if model is None:
            raise ValueError('engine="layerwise" needs the model to hook: pass `model=`.')
        if needs_jacobian:
            raise ValueError(
                "The layer-wise engine does not materialise the Jacobian, which this aggregator "
                "needs."
            )
        bd = 0 if batch_dim is None else batch_dim
        return LayerwiseGramianEngine(model, batch_dim=bd, chunk_size=chunk_size)
    if engine not in _ENGINES:
        raise ValueError(
            f"Unknown engine {engine!r}; expected 'auto', one of {available_engines()} or a "
            "GramianEngine instance."
        )
    built = _ENGINES[engine](chunk_size=chunk_size)
    return resolve_engine(built, needs_jacobian=needs_jacobian)
