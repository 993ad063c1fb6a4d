r"""GradNorm (Chen et al., ICML 2018): task weights that equalise the weighted gradient norms,
pushed towards tasks that train slower."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Param, Stateful, Weighting
from ._losses import LossAware
from ._state import LazyState
from ._validate import non_negative, positive


class GradNormWeighting(LossAware, LazyState, Weighting, Stateful):
    r"""GradNorm weights from the Gramian's diagonal and the losses.

    With :math:`n_i = \sqrt{G_{ii}}` (the gradient norms), the current weights :math:`w`
    (:math:`\mathbb 1` at the start), :math:`N_i = w_i n_i`, :math:`\bar N = \operatorname{mean}
    N`, the training rates :math:`\tilde L_i = L_i / L_i^{(0)}` (:math:`L^{(0)}` = the losses of
    the first call) and :math:`r_i = \tilde L_i / \operatorname{mean}\tilde L`, the target
    :math:`c_i = \bar N r_i^{\alpha}` is held constant and :math:`w` takes one gradient step on
    :math:`\sum_i |N_i - c_i|`:

    .. math::
        w \leftarrow w - \eta\, \operatorname{sign}(N - c) \odot n,
        \qquad w \leftarrow m\, \frac{\max(w, 0)}{\sum_i \max(w_i, 0)}.

    A call returns the weights from *before* that update (the model step uses them, the paper's
    order). Needs the losses (:meth:`observe_losses`; ``JDOptimizer`` passes them) and only the
    diagonal of the Gramian, so it works with every Gramian engine at no extra cost: an
    :math:`O(m)` update. Stateful (:math:`w`, :math:`L^{(0)}`), sync-free (``sign`` and
    ``where``), not differentiable.

    This is the paper's Algorithm 1 (a gradient step on :math:`w`, then renormalisation to
    :math:`\sum_i w_i = m`); the clamp at 0 is ours (the paper is silent on negative weights;
    at :math:`w_i = 0` the one-sided derivative :math:`n_i` lets a zeroed weight recover). The
    gradient in :math:`w` is LibMTL's (``tests/aggregation/test_libmtl_parity.py`` checks it
    against autograd of LibMTL's :math:`L_\text{grad}`, target detached). Differences with
    LibMTL's ``GradNorm``, all deliberate:

    * LibMTL parametrises :math:`w = m\operatorname{softmax}(s)` and trains :math:`s` with the
      model's optimiser (by default Adam, lr :math:`10^{-4}`, weight decay :math:`10^{-5}`,
      applied to :math:`s` too); here :math:`w` takes the paper's plain step with its own
      :math:`\eta`. That step is :math:`\eta\, n_i`: it scales with the gradient norms, so
      choose ``lr`` for the scale of the gradients (Adam on :math:`s` is scale-free).
    * LibMTL takes :math:`L^{(0)}` as the mean loss of the first epoch and keeps :math:`w = 1`
      during it; here :math:`L^{(0)}` is the first observed losses (the paper's
      :math:`L_i(0)`) and the update starts at the first call.
    * LibMTL's norms are over all shared parameters and its task-specific parameters get the
      gradient of :math:`\sum_i L_i`; here the norms are those of the Gramian the engine
      computes (the JD parameters). ``JDOptimizer(..., params=shared,
      other_params_grad="sum")`` gives LibMTL's split.

    Same as LibMTL: the call returns the weights from before its update, :math:`\alpha = 1.5`,
    :math:`w = \mathbb 1` at the start, no epsilon in :math:`\tilde L`.

    :param alpha: Asymmetry :math:`\alpha \ge 0` (LibMTL's default 1.5).
    :param lr: Step size :math:`\eta > 0` of the weights (ours; see above).

    >>> import torch
    >>> w = GradNormWeighting()
    >>> w.observe_losses(torch.tensor([1.0, 2.0]))
    >>> w(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # the first call: w = 1
    tensor([1., 1.])
    >>> w.observe_losses(torch.tensor([0.5, 2.0]))  # task 0's norm was larger: its weight fell
    >>> w(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    tensor([0.9620, 1.0380])
    """

    differentiable = False
    state_buffers = ("_weights", "_initial_losses")
    alpha = Param(non_negative("alpha"))
    lr = Param(positive("lr"))

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha = alpha
        self.lr = lr
        self.init_state()
        self.init_losses()

    def reset(self) -> None:
        """Back to :math:`w = 1`; the next losses become :math:`L^{(0)}`."""
        self.clear_state()

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        losses = self.current_losses(m, stat)
        if self._weights is None or self._weights.shape[0] != m:
            self._weights = torch.ones(m, dtype=stat.dtype, device=stat.device)
            self._initial_losses = losses.clone()
        w = self._weights.to(stat.dtype, copy=True)
        norms = stat.diagonal().clamp(min=0).sqrt()
        weighted = w * norms
        rates = losses / self._initial_losses.to(stat.dtype)
        relative = rates / rates.mean()
        target = weighted.mean() * relative.pow(self.alpha)
        stepped = (w - self.lr * torch.sign(weighted - target) * norms).clamp(min=0)
        total = stepped.sum()
        renormalised = torch.where(total > 0, m * stepped / torch.where(total > 0, total, 1.0), 1.0)
        self._weights.copy_(renormalised)
        return w.clone()


class GradNorm(GramianWeightedAggregator, Stateful):
    r"""Aggregator :math:`J \mapsto w^\top J` with the weights of :class:`GradNormWeighting`
    (call :meth:`observe_losses` before each call; ``JDOptimizer`` does it).

    >>> import torch
    >>> agg = GradNorm()
    >>> agg.observe_losses(torch.tensor([1.0, 2.0]))
    >>> agg(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    tensor([2., 1.])
    """

    differentiable = False
    alpha = Param(forward="gramian_weighting")
    lr = Param(forward="gramian_weighting")

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(GradNormWeighting(alpha, lr))

    def observe_losses(self, losses: Tensor) -> None:
        """Record the losses of the coming call."""
        self.gramian_weighting.observe_losses(losses)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(alpha={self.alpha!r}, lr={self.lr!r})"
