r"""STCH: smooth Tchebycheff weights from the (optionally nadir-normalised) gradient norms.

This aggregator only exists on an unmerged torchjd branch (PR #529); torchjd releases have a
loss-level ``torchjd.scalarization.STCH`` instead, which is a different thing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Param, Stateful, Weighting

_STATE_VECTORS = ("nadir_accumulator", "nadir_vector")


def _check_mu(mu: float) -> float:
    if not mu > 0:
        raise ValueError(f"Parameter `mu` should be a positive float. Found `mu = {mu}`.")
    return mu


def _check_warmup_steps(warmup_steps: int | None) -> int | None:
    if warmup_steps is not None and warmup_steps < 1:
        raise ValueError(
            "Parameter `warmup_steps` should be a positive integer or None. Found "
            f"`warmup_steps = {warmup_steps}`."
        )
    return warmup_steps


def stch_weights(norms: Tensor, mu: float, eps: float) -> Tensor:
    r"""Return :math:`\operatorname{softmax}\big((\ell - \max_i \ell_i) / \mu\big)` with
    :math:`\ell = \log(r + \varepsilon)`, i.e. :math:`w_i \propto (r_i + \varepsilon)^{1/\mu}`.

    >>> import torch
    >>> stch_weights(torch.tensor([1.0, 3.0]), mu=1.0, eps=1e-20)
    tensor([0.2500, 0.7500])
    """
    logs = torch.log(norms + eps)
    return torch.softmax((logs - logs.max()) / mu, dim=0)


class STCHWeighting(Weighting, Stateful):
    r"""Smooth Tchebycheff weighting: favours the objectives with the largest gradient norms.

    With the gradient norms :math:`g_i = \sqrt{\max(G_{ii}, \varepsilon)}`, the ratios
    :math:`r_i = g_i / \max(z_i, \varepsilon)` to a nadir vector :math:`z` (or :math:`r = g`
    when there is none yet), and :math:`\ell = \log(r + \varepsilon)`,

    .. math::
        w = \operatorname{softmax}\Big(\frac{\ell - \max_i \ell_i}{\mu}\Big),
        \qquad w_i \propto (r_i + \varepsilon)^{1/\mu}.

    Smaller :math:`\mu` concentrates the weights on the largest ratio (the Tchebycheff limit),
    larger :math:`\mu` flattens them towards uniform.

    With ``warmup_steps`` :math:`= T`, the weighting is stateful: calls :math:`1..T` return the
    uniform weights :math:`\mathbb{1}/m` and accumulate the (detached) norms; call :math:`T + 1`
    sets the nadir :math:`z` to their mean and uses it from then on; :meth:`reset` starts over.
    The state lives in buffers (``step``, ``has_nadir``, ``nadir_accumulator``,
    ``nadir_vector``), so the phase is chosen with ``torch.where`` (no host sync, no
    recompilation as the step advances) and ``state_dict()`` / ``load_state_dict()`` carry it,
    also into a fresh instance. The two vector buffers are allocated at the first call (on the
    Gramian's device and dtype); a later call with another ``m`` raises ``ValueError`` until
    :meth:`reset`.

    :param mu: Positive smoothing temperature :math:`\mu`.
    :param warmup_steps: ``None`` (no nadir, stateless) or the positive number of warm-up calls.
    :param eps: Small constant :math:`\varepsilon` guarding the square root, division and log.

    >>> import torch
    >>> STCHWeighting()(torch.tensor([[1.0, 0.0], [0.0, 9.0]]))
    tensor([0.2500, 0.7500])
    >>> w = STCHWeighting(warmup_steps=1)
    >>> w(torch.tensor([[1.0, 0.0], [0.0, 9.0]]))  # warm-up: uniform, nadir norms [1, 3]
    tensor([0.5000, 0.5000])
    >>> w(torch.tensor([[4.0, 0.0], [0.0, 9.0]]))  # ratios [2, 1]
    tensor([0.6667, 0.3333])
    """

    mu = Param(_check_mu)
    warmup_steps = Param(_check_warmup_steps)
    eps = Param()

    def __init__(
        self, mu: float = 1.0, warmup_steps: int | None = None, eps: float = 1e-20
    ) -> None:
        super().__init__()
        self.mu = mu
        self.warmup_steps = warmup_steps
        self.eps = eps
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("has_nadir", torch.zeros((), dtype=torch.bool))
        for name in _STATE_VECTORS:
            self.register_buffer(name, torch.zeros(0))

    def reset(self) -> None:
        """Forget the warm-up: step 0, no nadir, vector buffers back to size 0."""
        self.step.zero_()
        self.has_nadir.zero_()
        for name in _STATE_VECTORS:
            setattr(self, name, torch.zeros(0, device=self.step.device))

    def _prepare_state(self, m: int, like: Tensor) -> None:
        # Static checks only (shapes and devices): no data is read.
        if self.step.device != like.device:
            self.step = self.step.to(like.device)
            self.has_nadir = self.has_nadir.to(like.device)
        if self.nadir_accumulator.shape[0] == 0:
            for name in _STATE_VECTORS:
                setattr(self, name, torch.zeros(m, dtype=like.dtype, device=like.device))
        elif self.nadir_accumulator.shape[0] != m:
            raise ValueError(
                f"This {self.__class__.__name__} holds a warm-up state for "
                f"{self.nadir_accumulator.shape[0]} objectives but got a Gramian with {m} rows. "
                "Call reset() before changing the number of objectives."
            )
        elif self.nadir_accumulator.device != like.device:
            for name in _STATE_VECTORS:
                setattr(self, name, getattr(self, name).to(like.device))

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        norms = stat.diagonal().clamp(min=self.eps).sqrt()
        if self.warmup_steps is None:
            return stch_weights(norms, self.mu, self.eps)

        self._prepare_state(m, stat)
        state_dtype = self.nadir_accumulator.dtype
        in_warmup = self.step < self.warmup_steps
        finishing = self.step == self.warmup_steps
        accumulated = self.nadir_accumulator + torch.where(
            in_warmup, norms.detach().to(state_dtype), torch.zeros_like(self.nadir_accumulator)
        )
        nadir = torch.where(finishing, accumulated / self.warmup_steps, self.nadir_vector)
        has_nadir = self.has_nadir | finishing
        self.nadir_accumulator.copy_(accumulated)
        self.nadir_vector.copy_(nadir)
        self.has_nadir.copy_(has_nadir)
        self.step.add_(1)

        divisor = torch.where(has_nadir, nadir.to(stat.dtype).clamp(min=self.eps), 1.0)
        weights = stch_weights(norms / divisor, self.mu, self.eps)
        uniform = torch.full_like(weights, 1.0 / m)
        return torch.where(in_warmup, uniform, weights)

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
        # The vector buffers have the size of the saved state (0 before the first call).
        for name in _STATE_VECTORS:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, Tensor) and (
                incoming.shape != current.shape or incoming.dtype != current.dtype
            ):
                setattr(self, name, torch.empty_like(incoming, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _format_mu(mu: float) -> str:
    text = str(mu)
    return text.rstrip("0").rstrip(".") if "." in text else text


class STCH(GramianWeightedAggregator, Stateful):
    r"""Aggregator :math:`J \mapsto w^\top J` with the smooth Tchebycheff weights of
    :class:`STCHWeighting` (stateful when ``warmup_steps`` is set). Differentiable.

    :param mu: Positive smoothing temperature :math:`\mu`.
    :param warmup_steps: ``None`` or the positive number of warm-up calls (uniform weights while
        the nadir gradient norms are averaged).
    :param eps: Small constant :math:`\varepsilon` guarding the square root, division and log.

    >>> import torch
    >>> STCH()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([1.9233, 1.0000, 1.0000])
    """

    mu = Param(forward="gramian_weighting")
    warmup_steps = Param(forward="gramian_weighting")
    eps = Param(forward="gramian_weighting")

    def __init__(
        self, mu: float = 1.0, warmup_steps: int | None = None, eps: float = 1e-20
    ) -> None:
        super().__init__(STCHWeighting(mu=mu, warmup_steps=warmup_steps, eps=eps))

    def reset(self) -> None:
        """Forget the warm-up state of the weighting."""
        self.gramian_weighting.reset()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(mu={self.mu!r}, warmup_steps={self.warmup_steps!r}, "
            f"eps={self.eps!r})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}(mu={_format_mu(self.mu)})"
