r"""DWA (Liu et al., 2019): dynamic weight averaging from the losses' rate of change."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._params import Param
from ..aggregation._base import Stateful
from ._base import Scalarizer, shape_str, strictly_positive


class DWA(Scalarizer, Stateful):
    r"""Dynamic weight average: :math:`\sum_i w_i L_i` with

    .. math::
        w = k \operatorname{softmax}\big(\bar L^{(e-1)} / \bar L^{(e-2)} / T\big),

    where :math:`\bar L^{(e)}` is the mean of the (detached) losses seen during epoch
    :math:`e` and :math:`k` the number of losses; :math:`w = \mathbb 1` until two epochs are
    complete. **Call** :meth:`step` **at the end of every epoch** (a :meth:`step` with no call
    since the previous one does nothing).

    State: the running sum and count of the current epoch (device tensors, updated in place, so
    a compiled training step does not recompile) and the last two epoch means; all in
    ``state_dict``. :meth:`reset` clears it. A change of the losses' shape raises.

    :param temperature: :math:`T > 0`.

    >>> import torch
    >>> dwa = DWA()
    >>> dwa(torch.tensor([1.0, 2.0])); dwa.step(); dwa(torch.tensor([1.0, 1.0])); dwa.step()
    tensor(3.)
    tensor(2.)
    >>> dwa(torch.tensor([1.0, 1.0]))  # ratios [1, 0.5]: weights 2 softmax([0.5, 0.25])
    tensor(2.)
    """

    temperature = Param(strictly_positive("temperature"))

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature
        self._clear()

    def _clear(self) -> None:
        self.register_buffer("_sum", None)
        self.register_buffer("_count", None)
        self.register_buffer("_older", None)  # the last two epoch means
        self.register_buffer("_newer", None)

    def reset(self) -> None:
        """Forget every epoch."""
        self._clear()

    def forward(self, values: Tensor, /) -> Tensor:
        if self._older is not None:
            if self._older.shape != values.shape:
                raise ValueError(
                    f"The shape of `values` changed from {shape_str(self._older.shape)} to "
                    f"{shape_str(values.shape)}. Call `reset()` before changing it."
                )
            ratio = (self._newer / self._older).flatten() / self.temperature
            weights = (values.numel() * torch.softmax(ratio, dim=0)).reshape(values.shape)
        else:
            weights = torch.ones_like(values)
        detached = values.detach()
        if self._sum is None:
            self._sum = detached.clone()
            self._count = torch.ones((), dtype=values.dtype, device=values.device)
        elif self._sum.shape != values.shape:
            raise ValueError(
                f"The shape of `values` changed from {shape_str(self._sum.shape)} to "
                f"{shape_str(values.shape)} within an epoch. Call `reset()` before changing it."
            )
        else:
            self._sum.add_(detached)
            self._count.add_(1)
        return (weights * values).sum()

    def step(self) -> None:
        """End the epoch: its mean becomes the newest of the two kept epoch means."""
        if self._sum is None:
            return
        self._older = self._newer
        self._newer = self._sum / self._count
        self._sum = None
        self._count = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("_sum", "_count", "_older", "_newer"):
            incoming = state_dict.get(prefix + name)
            self._buffers[name] = None if incoming is None else torch.empty_like(incoming)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(temperature={self.temperature!r})"
