r"""FAMO (Liu et al., NeurIPS 2023): fast adaptive multitask optimisation, a loss-level method
that balances the tasks' log-loss decrease with one ordinary backward per step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._params import Param
from ..aggregation._base import Stateful
from ._base import Scalarizer, check_shape_matches, non_negative, shape_str
from .learned import _as_shape

_EPS = 1e-8
_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


class FAMO(Scalarizer, Stateful):
    r"""FAMO (torchjd 0.18's ``FAMO``). With task logits :math:`\xi` (float32 zeros),
    :math:`z = \operatorname{softmax}(\xi)` and :math:`s = L - b + 10^{-8}` (:math:`b` =
    ``min_losses``, default 0), a call returns

    .. math::
        \sum_i \frac{z_i}{c} \log s_i, \qquad c = \sum_i z_i / s_i \ (\text{detached}),

    whose gradient in :math:`L` is the convex combination :math:`(z/c)/s`. After the optimiser
    step, **call** :meth:`update` **with the new losses** (or let
    :class:`jdoptim.JDOptimizer` do it, see :doc:`/scalarization/index`): with
    :math:`\delta = \log s^{\text{prev}} - \log s^{\text{new}}`, the logits take one Adam step
    (:math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`, L2 decay ``weight_decay``) on
    the gradient :math:`z \odot (\delta - \langle z, \delta\rangle)`.

    The Adam moments and step count are device tensors updated by closed-form formulas (no
    ``torch.optim.Adam``, no host reads), so :meth:`update` can be compiled; they are created
    at the first :meth:`update` with the ``lr`` and ``weight_decay`` of that moment (as
    torchjd). Everything is in ``state_dict``. :meth:`reset` zeroes the logits in place and
    drops the Adam state and the previous losses.

    :param shape: Shape of the losses (an int or a sequence).
    :param min_losses: Optional lower bounds :math:`b` of the losses (shape ``shape``).
    :param lr: Adam learning rate of the logits, ``>= 0``.
    :param weight_decay: L2 decay of the logits, ``>= 0``.

    >>> import torch
    >>> famo = FAMO(3)
    >>> famo(torch.tensor([0.5, 1.2, 2.0]))
    tensor(0.0547)
    >>> famo.update(torch.tensor([0.45, 1.0, 1.9]))
    >>> famo.logits
    Parameter containing:
    tensor([ 0.0250, -0.0250,  0.0250], requires_grad=True)
    """

    lr = Param(non_negative("lr"))
    weight_decay = Param(non_negative("weight_decay"))

    def __init__(
        self,
        shape: int | tuple[int, ...] | list[int],
        min_losses: Tensor | None = None,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__()
        self._shape = _as_shape(shape)
        self.min_losses = min_losses
        self.lr = lr
        self.weight_decay = weight_decay
        self.logits = nn.Parameter(torch.zeros(self._shape))
        self._adam_hparams: tuple[float, float] | None = None
        self._clear()

    @property
    def min_losses(self) -> Tensor:
        """The lower bounds :math:`b` of the losses (a buffer; settable, shape checked)."""
        return self._buffers["min_losses"]

    @min_losses.setter
    def min_losses(self, value: Tensor | None) -> None:
        if value is not None and tuple(value.shape) != self._shape:
            raise ValueError(
                f"Parameter `min_losses` should have shape {shape_str(self._shape)} (matching the "
                f"shape of the logits). Found `min_losses.shape = {shape_str(value.shape)}`."
            )
        self._buffers["min_losses"] = torch.zeros(self._shape) if value is None else value

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the losses (fixed: the logits are created with it)."""
        return self._shape

    def _clear(self) -> None:
        for name in ("_previous", "_exp_avg", "_exp_avg_sq", "_step"):
            self.register_buffer(name, None)
        self._adam_hparams = None

    def reset(self) -> None:
        """Zero the logits in place; forget the Adam state and the previous losses."""
        with torch.no_grad():
            self.logits.zero_()
        self._clear()

    def _weights(self) -> Tensor:
        return torch.softmax(self.logits.detach().flatten(), dim=0).reshape(self._shape)

    def forward(self, values: Tensor, /) -> Tensor:
        check_shape_matches(values, self._shape, "logits")
        if self._previous is None or self._previous.dtype != values.dtype:
            self._previous = values.detach().clone()
        else:
            self._previous.copy_(values.detach())
        z = self._weights()
        shifted = values - self.min_losses + _EPS
        c = (z / shifted).sum().detach()
        return ((z / c) * torch.log(shifted)).sum()

    @torch.no_grad()
    def update(self, new_losses: Tensor) -> None:
        """One Adam step on the logits from the losses after the model's step (call it after
        each optimiser step, with the new losses of the same batch)."""
        if self._previous is None:
            raise ValueError(
                "`update` must be called after the scalarizer is called on the losses."
            )
        check_shape_matches(new_losses, self._shape, "logits")
        b = self.min_losses
        delta = torch.log(self._previous - b + _EPS) - torch.log(new_losses.detach() - b + _EPS)
        w = self.logits
        z = torch.softmax(w.flatten(), dim=0)
        d = delta.flatten().to(w.dtype)
        grad = (z * (d - (z * d).sum())).reshape(self._shape)
        if self._step is None:
            self._adam_hparams = (float(self.lr), float(self.weight_decay))
            self._exp_avg = torch.zeros_like(w)
            self._exp_avg_sq = torch.zeros_like(w)
            # int64: an in-place add on a 0-d float64 buffer is lost under torch.compile (2.13).
            self._step = torch.zeros((), dtype=torch.int64, device=w.device)
        lr, weight_decay = self._adam_hparams
        beta1, beta2 = _BETAS
        grad = grad + weight_decay * w
        self._step.add_(1)
        self._exp_avg.lerp_(grad, 1 - beta1)
        self._exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = self._step.to(torch.float64)
        correction1 = (1 - beta1**step).to(w.dtype)
        correction2_sqrt = (1 - beta2**step).sqrt().to(w.dtype)
        denominator = self._exp_avg_sq.sqrt() / correction2_sqrt + _ADAM_EPS
        w.sub_(lr / correction1 * self._exp_avg / denominator)

    def get_extra_state(self) -> Any:
        return {"adam_hparams": self._adam_hparams}

    def set_extra_state(self, state: Any) -> None:
        self._adam_hparams = state["adam_hparams"]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("_previous", "_exp_avg", "_exp_avg_sq", "_step"):
            incoming = state_dict.get(prefix + name)
            self._buffers[name] = None if incoming is None else torch.empty_like(incoming)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(shape={shape_str(self._shape)}, lr={self.lr!r}, "
            f"weight_decay={self.weight_decay!r})"
        )
