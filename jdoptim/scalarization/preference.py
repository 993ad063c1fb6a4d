r"""Preference-based scalarizations: :class:`COSMOS`, :class:`PBI`, :class:`STCH`."""

from __future__ import annotations

import torch
from torch import Tensor

from .._params import Param
from ._base import (
    Scalarizer,
    check_same_shape,
    non_negative,
    optional_tensor,
    strictly_positive,
)


class COSMOS(Scalarizer):
    r"""COSMOS (Ruchte & Grabocka, 2021): :math:`\langle r, L\rangle - \lambda \cos(r, L)`,
    rewarding losses aligned with the preference :math:`r` (``weights``, the shape of the
    losses). The cosine uses norms clamped at :math:`10^{-8}`.

    :param lambda_: :math:`\lambda \ge 0`.
    :param weights: The preference :math:`r`.

    >>> import torch
    >>> COSMOS(1.0, torch.tensor([0.2, 0.3, 0.5]))(torch.tensor([0.5, 1.2, 2.0]))
    tensor(0.4671)
    """

    lambda_ = Param(non_negative("lambda_"))
    weights = Param(optional_tensor("weights"), buffer=True)

    def __init__(self, lambda_: float, weights: Tensor) -> None:
        super().__init__()
        self.lambda_ = lambda_
        self.weights = weights

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("weights", self.weights, values)
        r, v = self.weights.flatten(), values.flatten()
        cosine = torch.sum(r / r.norm().clamp(min=1e-8) * (v / v.norm().clamp(min=1e-8)))
        return (self.weights * values).sum() - self.lambda_ * cosine

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(lambda_={self.lambda_!r}, weights={self.weights!r})"


class PBI(Scalarizer):
    r"""Penalty-based boundary intersection (Zhang & Li, 2007): with :math:`f = L - z`
    (``reference`` :math:`z`, default 0) and :math:`\hat w = w/\|w\|`,
    :math:`d_1 = f^\top\hat w`, :math:`d_2 = \sqrt{\|f - d_1\hat w\|^2 + 10^{-12}}`; returns
    :math:`d_1 + \theta d_2`.

    :param theta: Penalty :math:`\theta \ge 0`.
    :param weights: The preference direction :math:`w` (shape of the losses).
    :param reference: Optional reference point :math:`z` (shape of the losses).

    >>> import torch
    >>> PBI(5.0, torch.tensor([0.2, 0.3, 0.5]))(torch.tensor([0.5, 1.2, 2.0]))
    tensor(3.7873)
    """

    theta = Param(non_negative("theta"))
    weights = Param(optional_tensor("weights"), buffer=True)
    reference = Param(optional_tensor("reference"), buffer=True)

    def __init__(self, theta: float, weights: Tensor, reference: Tensor | None = None) -> None:
        super().__init__()
        self.theta = theta
        self.weights = weights
        self.reference = reference

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("weights", self.weights, values)
        check_same_shape("reference", self.reference, values)
        f = (values if self.reference is None else values - self.reference).flatten()
        w = self.weights.flatten()
        w_hat = w / w.norm()
        d1 = torch.dot(f, w_hat)
        d2 = torch.sqrt(((f - d1 * w_hat) ** 2).sum() + 1e-12)
        return d1 + self.theta * d2

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(theta={self.theta!r}, weights={self.weights!r}, "
            f"reference={self.reference!r})"
        )


class STCH(Scalarizer):
    r"""Smooth Tchebycheff scalarization (Lin et al., 2024): with :math:`y = \lambda \odot
    (L - z)` (:math:`\lambda` = ``weights``, default :math:`1/k`; :math:`z` = ``reference``,
    default 0), returns :math:`\mu \log\sum_i e^{(y_i - \max y)/\mu} + \max y`, a smooth
    maximum of :math:`y`. Not the Gramian aggregator :class:`jdoptim.aggregation.STCH`.

    :param mu: Smoothing :math:`\mu > 0`.

    >>> import torch
    >>> STCH(mu=1.0)(torch.tensor([0.5, 1.2, 2.0]))
    tensor(1.5306)
    """

    mu = Param(strictly_positive("mu"))
    weights = Param(optional_tensor("weights"), buffer=True)
    reference = Param(optional_tensor("reference"), buffer=True)

    def __init__(
        self, mu: float, weights: Tensor | None = None, reference: Tensor | None = None
    ) -> None:
        super().__init__()
        self.mu = mu
        self.weights = weights
        self.reference = reference

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("weights", self.weights, values)
        check_same_shape("reference", self.reference, values)
        shifted = values if self.reference is None else values - self.reference
        if self.weights is None:
            y = shifted.flatten() * (1.0 / values.numel())
        else:
            y = (self.weights * shifted).flatten()
        top = y.max()
        return self.mu * torch.logsumexp((y - top) / self.mu, dim=0) + top

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(mu={self.mu!r}, weights={self.weights!r}, "
            f"reference={self.reference!r})"
        )
