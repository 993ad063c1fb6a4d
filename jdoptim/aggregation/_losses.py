"""Methods that also read the step's losses (GradNorm, DB-MTL)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LossAware(nn.Module):
    """Mixin for weightings and aggregators that read the losses of the step as well.

    Call :meth:`observe_losses` with the losses before each call (detached, flattened to the
    ``m`` objectives); :class:`jdoptim.JDOptimizer` does it itself at every ``backward``.
    """

    def init_losses(self) -> None:
        self.register_buffer("_losses", None, persistent=False)

    def observe_losses(self, losses: Tensor) -> None:
        """Record the losses of the coming call."""
        self._losses = losses.detach().flatten()

    def current_losses(self, m: int, like: Tensor) -> Tensor:
        if self._losses is None:
            raise ValueError(
                f"{type(self).__name__} needs the losses: call `observe_losses(losses)` before "
                "each call (JDOptimizer does it)."
            )
        if self._losses.shape[0] != m:
            raise ValueError(
                f"{type(self).__name__} observed {self._losses.shape[0]} losses for {m} objectives."
            )
        return self._losses.to(dtype=like.dtype, device=like.device)


def decayed(rate: float, sigma: float, step: Tensor) -> Tensor:
    r"""The schedule :math:`\text{rate} / t^{\sigma}` at the (1-based) device step count."""
    return rate / torch.pow(step, sigma)
