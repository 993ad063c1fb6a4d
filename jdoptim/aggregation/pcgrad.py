r"""PCGrad: project each gradient onto the normal plane of the gradients it conflicts with
(Yu et al., 2020, "Gradient Surgery for Multi-Task Learning")."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.solvers._loop import fixed_loop

from ._base import GramianWeightedAggregator, Weighting


def random_visit_orders(m: int, device: torch.device) -> Tensor:
    """Return an ``[m, m]`` int64 tensor whose row ``i`` is a uniformly random permutation of
    ``range(m)``: the order in which PCGrad visits the other gradients for gradient ``i``.

    On CPU it makes ``m`` calls to :func:`torch.randperm` on the global generator (the draws of
    torchjd, so seeded results agree). On any other device it sorts uniform draws made on that
    device (``argsort(rand(m, m))``), so there is no host-to-device copy and no synchronisation.

    >>> import torch
    >>> sorted(random_visit_orders(4, torch.device("cpu"))[2].tolist())
    [0, 1, 2, 3]
    """
    if device.type == "cpu":
        # Exact-reference path: torchjd's RNG stream is m separate randperm(m) calls, so this is a
        # Python loop of m draws (no data-dependent control flow; unrolled under compile, which
        # measured 4.2 s of compile time at m = 128).
        return torch.stack([torch.randperm(m) for _ in range(m)])
    return torch.argsort(torch.rand(m, m, device=device), dim=1)


def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    r"""Coefficients :math:`C` such that row :math:`i` of :math:`C J` is the PCGrad projection of
    :math:`g_i`.

    Row :math:`i` starts at :math:`c = e_i` (so :math:`c^\top J = g_i`) and visits
    :math:`j` = ``orders[i, 0], orders[i, 1], ...`` in turn, skipping :math:`j = i`: when the
    current vector conflicts with :math:`g_j`, i.e. :math:`\langle c^\top J, g_j \rangle =
    (G c)_j < 0`, it is projected onto the normal plane of :math:`g_j`,

    .. math::
        c \leftarrow c - \frac{(G c)_j}{G_{jj}} e_j .

    All rows advance together, one position of their own order per iteration of a
    :func:`~jdoptim.solvers._loop.fixed_loop` (sequential per row, vectorised over rows).

    >>> import torch
    >>> G = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
    >>> pcgrad_coefficients(G, torch.tensor([[0, 1], [1, 0]]))
    tensor([[1.0000, 0.5789],
            [1.2222, 1.0000]])
    """
    m = gramian.shape[0]
    rows = torch.arange(m, device=gramian.device)

    def body(coefficients: Tensor, position: Tensor) -> tuple[Tensor, Tensor]:
        j = orders.index_select(1, position.reshape(1)).squeeze(1)  # [m]: next index per row
        inner = (gramian.index_select(0, j) * coefficients).sum(dim=1)  # (G c_i)_{j_i}
        project = (j != rows) & (inner < 0)
        diagonal = gramian.diagonal()  # made inside the body: loop inputs must not alias
        scale = torch.where(project, diagonal.gather(0, j), torch.ones_like(inner))
        step = torch.where(project, inner / scale, torch.zeros_like(inner))
        coefficients = coefficients.scatter_add(1, j.unsqueeze(1), -step.unsqueeze(1))
        return coefficients, position + 1

    init = (
        torch.eye(m, dtype=gramian.dtype, device=gramian.device),
        torch.zeros((), dtype=torch.int64, device=gramian.device),
    )
    coefficients, _ = fixed_loop(m, body, init)
    return coefficients


class PCGradWeighting(Weighting):
    r"""PCGrad weights :math:`w = C^\top \mathbb{1}`, where row :math:`i` of :math:`C` expresses
    the projected gradient :math:`\tilde g_i` in terms of the rows of :math:`J` (see
    :func:`pcgrad_coefficients`), so that :math:`w^\top J = \sum_i \tilde g_i`.

    Every gradient visits the others in its own uniformly random order (see
    :func:`random_visit_orders`). For :math:`m \le 2` the result does not depend on the orders.
    Computed in the Gramian's dtype (at least float32). Not differentiable.

    >>> import torch
    >>> PCGradWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([2.2222, 1.5789])
    """

    differentiable = False

    def forward(self, stat: Tensor, /) -> Tensor:
        work = stat.to(torch.promote_types(stat.dtype, torch.float32))
        orders = random_visit_orders(stat.shape[0], stat.device)
        return pcgrad_coefficients(work, orders).sum(dim=0).to(stat.dtype)


class PCGrad(GramianWeightedAggregator):
    r"""Aggregator returning the sum of the PCGrad-projected gradients,
    :math:`\sum_i \tilde g_i` (see :class:`PCGradWeighting`). Not differentiable.

    >>> import torch
    >>> PCGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5848, 3.8012, 3.8012])
    """

    differentiable = False

    def __init__(self) -> None:
        super().__init__(PCGradWeighting())
