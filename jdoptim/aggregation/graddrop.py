r"""GradDrop: randomly keep, per coordinate, only the positive or only the negative parts
(Chen et al., 2020, "Just Pick a Sign")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._base import Aggregator, Param
from ._format import vector_to_str


def _identity(p: Tensor) -> Tensor:
    return p


def _check_leak(leak: Tensor | None) -> Tensor | None:
    if leak is not None and (not isinstance(leak, Tensor) or leak.dim() != 1):
        shape = leak.shape if isinstance(leak, Tensor) else type(leak).__name__
        raise ValueError(f"leak must be a 1-dimensional tensor. Found leak.shape = {shape}.")
    return leak


class GradDrop(Aggregator):
    r"""Gradient sign dropout.

    For every column :math:`j` of :math:`J`, the sign purity

    .. math::
        P_j = \frac{1}{2}\Big(1 + \frac{\sum_i J_{ij}}{\sum_i |J_{ij}|}\Big) \in [0, 1]

    is compared with one threshold :math:`U_j \sim \mathcal{U}[0, 1)` (``torch.rand(n)``, shared
    by all rows). Entry :math:`(i, j)` is kept when
    :math:`M_{ij} = [f(P_j) > U_j \wedge J_{ij} > 0] \vee [f(P_j) < U_j \wedge J_{ij} < 0]`, and

    .. math::
        d_j = \sum_i \big(\ell_i + (1 - \ell_i) M_{ij}\big) J_{ij}.

    With the identity :math:`f` and no leak, column :math:`j` returns the sum of its positive
    entries with probability :math:`P_j` and the sum of its negative entries otherwise. An
    all-zero column has :math:`P_j` = NaN and returns 0. Not differentiable (runs under
    :func:`torch.no_grad`).

    :param f: Function applied element-wise to the purities :math:`P` (identity by default).
    :param leak: Optional 1-D tensor :math:`\ell` of ``m`` leak coefficients (0 by default): row
        :math:`i` always passes the fraction :math:`\ell_i` of its entries. Cast to the input's
        dtype and device at call time.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> GradDrop()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([6., 2., 2.])
    """

    differentiable = False
    leak = Param(_check_leak, buffer=True)

    def __init__(
        self, f: Callable[[Tensor], Tensor] = _identity, leak: Tensor | None = None
    ) -> None:
        super().__init__()
        self.f = f
        self.leak = leak

    def forward(self, matrix: Tensor, /) -> Tensor:
        m, n = matrix.shape
        if self.leak is not None and self.leak.shape[0] != m:
            raise ValueError(
                f"Parameter `matrix` should be a matrix of exactly {self.leak.shape[0]} rows (i.e."
                f" the number of leak scalars). Found `matrix` of shape `{matrix.shape}`."
            )
        if n == 0:
            return torch.zeros(0, dtype=matrix.dtype, device=matrix.device)
        purity = 0.5 * (1 + matrix.sum(dim=0) / matrix.abs().sum(dim=0))
        threshold = torch.rand(n, dtype=matrix.dtype, device=matrix.device)
        fp = self.f(purity)
        mask = ((fp > threshold) & (matrix > 0)) | ((fp < threshold) & (matrix < 0))
        kept = mask.to(matrix.dtype)
        if self.leak is not None:
            leak = self.leak.to(dtype=matrix.dtype, device=matrix.device).unsqueeze(1)
            kept = leak + (1 - leak) * kept
        return (kept * matrix).sum(dim=0)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(f={self.f!r}, leak={self.leak!r})"

    def __str__(self) -> str:
        if self.leak is None:
            return self.__class__.__name__
        return f"{self.__class__.__name__}({vector_to_str(self.leak)})"
