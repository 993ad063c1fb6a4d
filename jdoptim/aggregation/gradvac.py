r"""GradVac (Wang et al., ICLR 2021): gradient vaccine, adaptive cosine-similarity targets."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Param, Stateful, Weighting
from ._state import LazyState
from ._validate import in_unit_interval, non_negative


def _visit_order(m: int, device: torch.device) -> Tensor:
    """The ``[m, m-1]`` table of the ``j`` visited by each ``i``: ``m`` draws of
    ``torch.randperm(m - 1)`` from the global CPU generator (torchjd's RNG use, even for
    accelerator inputs), copied to ``device`` without a sync."""
    rows = []
    for i in range(m):
        others = torch.tensor([j for j in range(m) if j != i], dtype=torch.int64)
        rows.append(others[torch.randperm(m - 1)])
    table = torch.stack(rows) if rows else torch.zeros(0, max(m - 1, 0), dtype=torch.int64)
    return table.to(device, non_blocking=True)


def gradvac_weights(
    gramian: Tensor, targets: Tensor, order: Tensor, beta: float, eps: float
) -> tuple[Tensor, Tensor]:
    r"""One GradVac pass: return the weights and the updated targets :math:`\hat\Phi`.

    For each :math:`i` (all in parallel, they do not interact) and each :math:`j` of row
    :math:`i` of ``order`` in turn, with :math:`g_i^{pc} = \sum_k C_{ik} g_k` (:math:`C = I` at
    the start), :math:`\varphi = \langle g_i^{pc}, g_j\rangle / (\|g_i^{pc}\|\|g_j\| + \epsilon)`
    and :math:`\hat\varphi = \hat\Phi_{ij}`: if :math:`\varphi < \hat\varphi`,

    .. math::
        C_{ij} \mathrel{+}= \frac{\|g_i^{pc}\| \big(\hat\varphi\sqrt{1-\varphi^2}
        - \varphi\sqrt{1-\hat\varphi^2}\big)}{\|g_j\|\sqrt{1-\hat\varphi^2} + \epsilon},

    and always :math:`\hat\Phi_{ij} \leftarrow (1-\beta)\hat\varphi + \beta\varphi`. The
    weights are the column sums of :math:`C`. Sync-free: the conditions are ``torch.where``.

    >>> import torch
    >>> G = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
    >>> w, _ = gradvac_weights(G, torch.zeros(2, 2), torch.tensor([[1], [0]]), 0.5, 1e-8)
    >>> w
    tensor([2.2222, 1.5789])
    """
    m = gramian.shape[0]
    dtype = gramian.dtype
    columns = torch.arange(m, device=gramian.device)
    coefficients = torch.eye(m, dtype=dtype, device=gramian.device)
    products = gramian.clone()  # row i: C[i] @ G
    diag_norms = gramian.diagonal().clamp(min=0).sqrt()
    for t in range(m - 1):
        j = order[:, t]
        n_i = (products * coefficients).sum(dim=1).clamp(min=0).sqrt()
        n_j = diag_norms[j]
        phi = products.gather(1, j.unsqueeze(1)).squeeze(1) / (n_i * n_j + eps)
        phi_hat = targets.gather(1, j.unsqueeze(1)).squeeze(1)
        root = (1 - phi * phi).clamp(min=0).sqrt()
        root_hat = (1 - phi_hat * phi_hat).clamp(min=0).sqrt()
        w = n_i * (phi_hat * root - phi * root_hat) / (n_j * root_hat + eps)
        correct = (phi < phi_hat).unsqueeze(1)
        onehot = columns.unsqueeze(0) == j.unsqueeze(1)
        coefficients = torch.where(correct, coefficients + w.unsqueeze(1) * onehot, coefficients)
        products = torch.where(correct, products + w.unsqueeze(1) * gramian[j], products)
        updated = ((1 - beta) * phi_hat + beta * phi).unsqueeze(1)
        targets = torch.where(onehot, updated, targets)
    return coefficients.sum(dim=0), targets


class GradVacWeighting(LazyState, Weighting, Stateful):
    r"""GradVac weights (torchjd 0.18's ``GradVacWeighting``), from the Gramian; see
    :func:`gradvac_weights`.

    Each call visits the other objectives of every :math:`i` in a random order: ``m`` draws of
    ``torch.randperm(m - 1)`` from the global CPU generator, exactly as torchjd (so seeded runs
    reproduce it; ``m = 2`` uses no randomness). The permutation table is drawn eagerly on the
    CPU and copied to the device without a sync; the rest is sync-free. Under
    ``torch.compile`` the draws are part of the graph (same generator).

    Stateful: the target cosines :math:`\hat\Phi \in \mathbb{R}^{m \times m}` (zero at the
    start, input dtype) restart silently when ``m`` or the dtype changes, and at :meth:`reset`.
    A non-finite input makes :math:`\hat\Phi` NaN until :meth:`reset`. Not differentiable.

    :param beta: EMA rate :math:`\beta \in [0, 1]` of the targets.
    :param eps: :math:`\epsilon \ge 0` in the denominators.

    >>> import torch
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> GradVacWeighting()(J @ J.T)
    tensor([2.2222, 1.5789])
    """

    differentiable = False
    state_buffers = ("_targets",)
    beta = Param(in_unit_interval("beta"))
    eps = Param(non_negative("eps"))

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps
        self.init_state()

    def reset(self) -> None:
        """Forget the target cosines."""
        self.clear_state()

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        targets = self._targets
        if targets is None or targets.shape[0] != m or targets.dtype != stat.dtype:
            targets = torch.zeros(m, m, dtype=stat.dtype, device=stat.device)
            self._targets = targets
        elif targets.device != stat.device:
            targets = targets.to(stat.device)
            self._targets = targets
        order = _visit_order(m, stat.device)
        weights, updated = gradvac_weights(stat, targets, order, self.beta, self.eps)
        targets.copy_(updated)
        return weights


class GradVac(GramianWeightedAggregator, Stateful):
    r"""Aggregator :math:`J \mapsto w^\top J` with the weights of :class:`GradVacWeighting`
    (torchjd 0.18's ``GradVac``). Stateful, random for ``m >= 3``, not differentiable.

    >>> import torch
    >>> GradVac()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5848, 3.8012, 3.8012])
    """

    differentiable = False
    beta = Param(forward="gramian_weighting")
    eps = Param(forward="gramian_weighting")

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__(GradVacWeighting(beta, eps))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(beta={self.beta!r}, eps={self.eps!r})"
