r"""ExcessMTL (He et al., ICML 2024): robust task weights from the excess risks, estimated with
accumulated squared gradients (AdaGrad-style)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Param, Stateful, WeightedAggregator, Weighting
from ._state import LazyState
from ._validate import non_negative, positive

_EPS = 1e-7


class ExcessMTLWeighting(LazyState, Weighting, Stateful):
    r"""ExcessMTL weights (torchjd 0.18's ``ExcessMTLWeighting``), read from the Jacobian itself.

    Each call accumulates :math:`S \leftarrow S + J \odot J` and estimates the excess risks
    :math:`e_i = \sum_k J_{ik}^2 / \sqrt{S_{ik} + 10^{-7}}`. During the first
    ``n_warmup_steps`` calls the :math:`e` are summed into :math:`\sigma` and the weights stay
    at their initial :math:`\mathbb{1}/m`. After that the risks are divided by a baseline
    :math:`b + 10^{-7}` (:math:`b = \sigma / N` after a warm-up; without warm-up, :math:`b` is
    the first call's :math:`e`, which is then used raw) and the weights take one exponentiated
    step :math:`\lambda \leftarrow \operatorname{softmax}(\log\lambda + \eta e)`.

    Stateful: :math:`S \in \mathbb{R}^{m \times n}`, :math:`\sigma`, :math:`\lambda`, :math:`b`
    and the step counter, all in the input dtype and device; they restart silently when
    :math:`(m, n)`, the dtype or the device change, and at :meth:`reset`. Needs the full
    Jacobian (``m n`` extra memory), so it cannot run from a Gramian. Not differentiable.
    Sync-free: the warm-up and baseline branches are ``torch.where`` selections on a device
    counter.

    :param robust_step_size: Step size :math:`\eta > 0`.
    :param n_warmup_steps: Number :math:`N \ge 0` of warm-up calls.

    >>> import torch
    >>> ExcessMTLWeighting()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1192, 0.8808])
    """

    input_kind = "matrix"
    differentiable = False
    state_buffers = ("_sq_sum", "_warmup_sum", "_lambda", "_baseline", "_step", "_has_baseline")
    robust_step_size = Param(positive("robust_step_size"))
    n_warmup_steps = Param(non_negative("n_warmup_steps"))

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps
        self.init_state()

    def reset(self) -> None:
        """Forget every statistic: the next call is uniform and re-enters the warm-up."""
        self.clear_state()

    def _prepare(self, matrix: Tensor) -> None:
        s = self._sq_sum
        if (
            s is None
            or s.shape != matrix.shape
            or s.dtype != matrix.dtype
            or (s.device != matrix.device)
        ):
            m = matrix.shape[0]
            like = {"dtype": matrix.dtype, "device": matrix.device}
            self._sq_sum = torch.zeros_like(matrix)
            self._warmup_sum = torch.zeros(m, **like)
            self._lambda = torch.full((m,), 1.0 / m, **like)
            self._baseline = torch.zeros(m, **like)
            self._step = torch.zeros((), dtype=torch.int64, device=matrix.device)
            self._has_baseline = torch.zeros((), dtype=torch.bool, device=matrix.device)

    def forward(self, stat: Tensor, /) -> Tensor:
        self._prepare(stat)
        squares = stat * stat
        sq_sum = self._sq_sum + squares
        risks = (squares / torch.sqrt(sq_sum + _EPS)).sum(dim=1)
        warm = self._step < self.n_warmup_steps
        no_baseline = ~self._has_baseline
        if self.n_warmup_steps > 0:
            baseline = torch.where(
                no_baseline, self._warmup_sum / self.n_warmup_steps, self._baseline
            )
            scaled = risks / (baseline + _EPS)
        else:
            baseline = torch.where(no_baseline, risks, self._baseline)
            scaled = torch.where(no_baseline, risks, risks / (self._baseline + _EPS))
        stepped = torch.softmax(torch.log(self._lambda) + self.robust_step_size * scaled, dim=0)
        lam = torch.where(warm, self._lambda, stepped)
        self._sq_sum.copy_(sq_sum)
        self._warmup_sum.copy_(torch.where(warm, self._warmup_sum + risks, self._warmup_sum))
        self._baseline.copy_(torch.where(warm, self._baseline, baseline))
        self._has_baseline.copy_(self._has_baseline | ~warm)
        self._lambda.copy_(lam)
        self._step.add_(1)
        return lam

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(robust_step_size={self.robust_step_size!r}, "
            f"n_warmup_steps={self.n_warmup_steps!r})"
        )


class ExcessMTL(WeightedAggregator, Stateful):
    r"""Aggregator :math:`J \mapsto \lambda^\top J` with the weights of
    :class:`ExcessMTLWeighting` (torchjd 0.18's ``ExcessMTL``). Stateful, not differentiable.

    :param robust_step_size: Step size :math:`\eta > 0`.
    :param n_warmup_steps: Number :math:`N \ge 0` of warm-up calls.

    >>> import torch
    >>> ExcessMTL()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([4.8080, 1.0000, 1.0000])
    """

    differentiable = False
    robust_step_size = Param(forward="weighting")
    n_warmup_steps = Param(forward="weighting")

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps))

    def reset(self) -> None:
        """Reset the weighting's state."""
        self.weighting.reset()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(robust_step_size={self.robust_step_size!r}, "
            f"n_warmup_steps={self.n_warmup_steps!r})"
        )
