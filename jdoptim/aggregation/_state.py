"""Lazily created state buffers that still round-trip through ``state_dict``."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn


class LazyState(nn.Module):
    """Mixin for stateful weightings whose state buffers are created at the first call.

    The names in ``state_buffers`` are registered as ``None`` (absent from ``state_dict``) until
    the first call creates them; :meth:`clear_state` drops them again (what ``reset()`` does).
    ``load_state_dict`` creates any of them present in the checkpoint, so a saved state loads
    into a fresh object (torchjd 0.18 fails with "Unexpected key(s)" there).
    """

    state_buffers: ClassVar[tuple[str, ...]] = ()

    def init_state(self) -> None:
        for name in self.state_buffers:
            self.register_buffer(name, None)

    def clear_state(self) -> None:
        for name in self.state_buffers:
            self._buffers[name] = None

    def has_state(self) -> bool:
        return all(self._buffers.get(name) is not None for name in self.state_buffers)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self.state_buffers:
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if incoming is None:  # saved before the first call (or after reset())
                self._buffers[name] = None
            elif isinstance(incoming, Tensor) and (
                current is None or current.shape != incoming.shape
            ):
                device = incoming.device if current is None else current.device
                self._buffers[name] = incoming.new_empty(incoming.shape, device=device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
