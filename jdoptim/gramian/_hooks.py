r"""The forward hooks an engine places on a model's modules.

A hook holds its engine through a weak reference, so the model does not keep the engine alive
(when the engine is collected, its finalizer removes the hooks). A copy or a pickle of the
model (``copy.deepcopy(model)`` for an EMA, ``torch.save(model)``) carries an *inert* hook: the
engine belongs to the original model, so the copy's forward passes record nothing into it. A
:class:`~jdoptim.JDOptimizer` copied together with its model rebuilds its engine on the copy
(see the engines' ``__reduce__``).

>>> import copy, pickle
>>> class Engine:
...     calls = 0
...     def record(self, tag, module, args, output):
...         self.calls += 1
>>> engine, lin = Engine(), torch.nn.Linear(2, 2)
>>> _ = lin.register_forward_hook(EngineHook(engine, Engine.record, "tag"))
>>> _ = lin(torch.ones(2)); _ = copy.deepcopy(lin)(torch.ones(2))
>>> _ = pickle.loads(pickle.dumps(lin))(torch.ones(2))
>>> engine.calls  # only the original module's call
1
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch  # noqa: F401  (the doctest)


class EngineHook:
    """A forward (pre-)hook calling ``fn(engine, *bound, *hook_args)`` while ``engine`` lives.

    ``passive``: the hook returns nothing and changes nothing (``exact_call`` lets a layer rule
    claim a module that carries only passive hooks).
    """

    def __init__(
        self, engine: Any, fn: Callable[..., Any] | None, *bound: Any, passive: bool = True
    ) -> None:
        self._engine = None if engine is None else weakref.ref(engine)
        self._fn = fn
        self.bound = bound
        self._jdoptim_passive = passive

    def __call__(self, *args: Any) -> Any:
        ref = self._engine
        if ref is None:
            return None
        engine = ref()
        if engine is None:
            return None
        return self._fn(engine, *self.bound, *args)  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> EngineHook:
        return inert_hook()

    def __reduce__(self) -> tuple[Callable[[], EngineHook], tuple[()]]:
        return (inert_hook, ())


def inert_hook() -> EngineHook:
    """The hook a copied or unpickled model carries in place of an engine's: it does nothing."""
    return EngineHook(None, None)
