r"""CR-MOGM (Zhou et al., NeurIPS 2022): exponential smoothing of any weighting's output."""

from __future__ import annotations

from torch import Tensor

from ._base import Param, Stateful, Weighting
from ._state import LazyState
from ._validate import in_unit_interval


class CRMOGMWeighting(LazyState, Weighting, Stateful):
    r"""Smoothed weights :math:`\lambda_t = \alpha \lambda_{t-1} + (1 - \alpha)\hat\lambda_t`,
    where :math:`\hat\lambda_t` is the inner ``weighting``'s output (torchjd 0.18's
    ``CRMOGMWeighting``).

    :math:`\lambda_0` is ``initial_weights`` (cast to :math:`\hat\lambda`'s dtype and device;
    its shape must be ``(m,)``), or :math:`\hat\lambda_1` itself. The inner weighting runs
    first, so its state advances even when a shape check then fails. Reads whatever the inner
    weighting reads; differentiable when it is (the stored state is detached, unlike torchjd,
    so no graph is kept across steps). Use it through a wrapper, e.g.
    ``GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))``.

    Stateful: a change of the number of objectives raises (call :meth:`reset`, which also
    resets a stateful inner weighting and keeps ``initial_weights``).

    :param weighting: The inner weighting (a reassignable submodule).
    :param alpha: Smoothing factor in :math:`[0, 1]`.
    :param initial_weights: Optional :math:`\lambda_0`.

    >>> import torch
    >>> from jdoptim.aggregation import MeanWeighting
    >>> CRMOGMWeighting(MeanWeighting(), alpha=0.5, initial_weights=torch.ones(2))(torch.eye(2))
    tensor([0.7500, 0.7500])
    """

    state_buffers = ("_lambda",)
    alpha = Param(in_unit_interval("alpha"))
    initial_weights = Param()  # not checked (as torchjd): its shape is checked at the call

    def __init__(
        self, weighting: Weighting, alpha: float = 0.9, initial_weights: Tensor | None = None
    ) -> None:
        super().__init__()
        self.weighting = weighting
        self.alpha = alpha
        self.initial_weights = initial_weights
        self.init_state()

    @property
    def input_kind(self) -> str:  # type: ignore[override]
        return self.weighting.input_kind

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return self.weighting.differentiable

    def reset(self) -> None:
        """Forget the smoothed weights and reset a stateful inner weighting."""
        self.clear_state()
        if isinstance(self.weighting, Stateful):
            self.weighting.reset()

    def forward(self, stat: Tensor, /) -> Tensor:
        current = self.weighting(stat)
        m = current.shape[0]
        previous = self._lambda
        if previous is None:
            if self.initial_weights is not None:
                if tuple(self.initial_weights.shape) != (m,):
                    raise ValueError(
                        f"`initial_weights` has shape {tuple(self.initial_weights.shape)}, "
                        f"expected ({m},)."
                    )
                previous = self.initial_weights.to(dtype=current.dtype, device=current.device)
            else:
                previous = current.detach()
        elif previous.shape[0] != m:
            raise ValueError(
                f"The number of objectives changed from {previous.shape[0]} to {m}. Call "
                "`reset()` before changing the number of objectives."
            )
        weights = self.alpha * previous + (1 - self.alpha) * current
        self._lambda = weights.detach().clone()
        return weights
