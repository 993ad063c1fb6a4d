"""Validated, settable constructor parameters shared by aggregators, weightings and
scalarizers: the :class:`Param` descriptor and the :class:`ParamModule` base."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class Param:
    """A validated, settable constructor parameter (a data descriptor).

    ``name = Param(check)`` on a :class:`ParamModule` subclass makes ``obj.name = value`` run
    ``check(value)`` (which raises on a bad value and returns the value to store) and then the
    optional ``on_set(obj, stored)`` hook. Constructors assign through the same descriptor, so a
    setter raises exactly the constructor's error, and the new value is what the next call reads.

    * ``forward="weighting"``: the value lives on ``obj.weighting`` (an aggregator forwarding to
      its inner weighting); ``obj.name`` reads and writes ``obj.weighting.name``.
    * ``buffer=True``: a tensor (or ``None``) kept in ``obj._buffers[name]``, so it follows
      ``.to()`` and appears in ``state_dict`` under ``name``.

    >>> class W(ParamModule):
    ...     size = Param(lambda v: v if v > 0 else _raise(ValueError("size must be positive")))
    ...     def __init__(self, size):
    ...         super().__init__()
    ...         self.size = size
    >>> w = W(2); w.size = 3; w.size
    3
    >>> W(0)
    Traceback (most recent call last):
    ...
    ValueError: size must be positive
    """

    def __init__(
        self,
        check: Callable[[Any], Any] | None = None,
        *,
        on_set: Callable[[Any, Any], None] | None = None,
        forward: str | None = None,
        buffer: bool = False,
    ) -> None:
        self.check = check
        self.on_set = on_set
        self.forward = forward
        self.buffer = buffer
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        if self.forward is not None:
            return getattr(getattr(obj, self.forward), self.name)
        if self.buffer:
            return obj._buffers[self.name]
        return obj.__dict__["_param_" + self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        if self.forward is not None:
            setattr(getattr(obj, self.forward), self.name, value)
            return
        if self.check is not None:
            value = self.check(value)
        if self.buffer:
            obj._buffers[self.name] = value
        else:
            obj.__dict__["_param_" + self.name] = value
        if self.on_set is not None:
            self.on_set(obj, value)


def _raise(error: Exception) -> Any:
    raise error


class ParamModule(nn.Module):
    """An :class:`nn.Module` whose :class:`Param` (and ``property``) attributes are always set
    through their descriptor (``nn.Module.__setattr__`` would otherwise bypass it for
    buffers)."""

    def __setattr__(self, name: str, value: Any) -> None:
        descriptor = getattr(type(self), name, None)
        if isinstance(descriptor, Param) or (
            # A property over a buffer (FAMO.min_losses): its setter validates. Other
            # properties take the ordinary path (which Dynamo can trace).
            isinstance(descriptor, property) and name in self.__dict__.get("_buffers", ())
        ):
            descriptor.__set__(self, value)
            return
        super().__setattr__(name, value)
