r"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., 2022)."""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import Tensor

from ._base import Param, Stateful, WeightedAggregator, Weighting

_DEPS = ("numpy", "cvxpy", "ecos")


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, but got {value}.")
    return value


def _check_max_norm(max_norm: float) -> float:
    if max_norm < 0:
        raise ValueError(f"max_norm must be non-negative, but got {max_norm}.")
    return max_norm


def _resize_state(obj: _NashMTLWeighting, n_tasks: int) -> None:
    # A new number of tasks starts a new sequence (the state has one entry per task).
    if "prvs_alpha" in obj._buffers and obj.prvs_alpha.shape[0] != n_tasks:
        obj.reset()


def _check_deps(owner: str) -> None:
    missing = [name for name in _DEPS if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{owner} requires {missing} to be installed. Install them with: "
            f'pip install "jdoptim[nash_mtl]"'
        )


class _NashMTLWeighting(Weighting, Stateful):
    """The stateful weighting behind :class:`NashMTL` (reads the Jacobian itself).

    State (buffers, so that ``state_dict`` round-trips it): ``step``, ``prvs_alpha`` (the last
    bargaining solution), ``normalization_factor`` and ``gtg`` (the last normalised Gramian).
    The cvxpy problem is rebuilt lazily from the state, so a restored instance continues the
    same sequence.
    """

    input_kind = "matrix"
    differentiable = False
    n_tasks = Param(lambda v: _check_positive_int(v, "n_tasks"), on_set=_resize_state)
    max_norm = Param(_check_max_norm)
    update_weights_every = Param(lambda v: _check_positive_int(v, "update_weights_every"))
    optim_niter = Param(lambda v: _check_positive_int(v, "optim_niter"))

    def __init__(
        self, n_tasks: int, max_norm: float, update_weights_every: int, optim_niter: int
    ) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("prvs_alpha", torch.ones(n_tasks, dtype=torch.float64))
        self.register_buffer("normalization_factor", torch.ones(1, dtype=torch.float64))
        self.register_buffer("gtg", torch.eye(n_tasks, dtype=torch.float64))
        self._problem = None

    def reset(self) -> None:
        self.step.zero_()
        self.prvs_alpha = torch.ones(self.n_tasks, dtype=torch.float64)
        self.normalization_factor.fill_(1.0)
        self.gtg = torch.eye(self.n_tasks, dtype=torch.float64)
        self._problem = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._problem = None

    def _build_problem(self) -> None:
        # Eager-only, CPU/numpy path (cvxpy + ECOS): the documented exception to the sync-free
        # rule, see the class docstring and docs/faq.rst.
        import cvxpy as cp

        n = self.n_tasks
        alpha = cp.Variable(shape=(n,), nonneg=True)
        alpha_prev = cp.Parameter(shape=(n,), value=self.prvs_alpha.numpy().copy())
        gtg = cp.Parameter(shape=(n, n), value=self.gtg.numpy().copy())
        nu = cp.Parameter(shape=(1,), value=self.normalization_factor.numpy().copy())
        # Linearisation of the concave part around alpha_prev (one step of the CCP).
        gtg_alpha_prev = gtg @ alpha_prev
        slope = 1 / alpha_prev + (1 / gtg_alpha_prev) @ gtg
        linear_term = slope @ (alpha - alpha_prev)
        gtg_alpha = gtg @ alpha
        constraints = [-cp.log(alpha[i] * nu) - cp.log(gtg_alpha[i]) <= 0 for i in range(n)]
        objective = cp.Minimize(cp.sum(gtg_alpha) + linear_term / nu)
        self._problem = (cp.Problem(objective, constraints), alpha, alpha_prev, gtg, nu)

    def _solve(self, alpha_t):  # type: ignore[no-untyped-def]
        """The sequence of convex problems of Nash-MTL, warm-started at ``alpha_t`` (numpy)."""
        # Eager-only CPU/numpy path (documented exception to the sync-free rule).
        import cvxpy as cp
        import numpy as np

        problem, alpha, alpha_prev, gtg, _ = self._problem
        for _ in range(self.optim_niter):
            alpha.value = alpha_t
            alpha_prev.value = alpha_t
            try:
                with warnings.catch_warnings():
                    # The parameters enter non-affinely (1 / alpha_prev): expected, not an issue.
                    warnings.filterwarnings("ignore", message=".*not DPP.*")
                    problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
            except (cp.error.SolverError, ValueError):
                alpha.value = alpha_prev.value
            # Stopping rules, evaluated at the *previous* iterate, which is kept on stopping.
            if alpha.value is None:
                break
            residual = gtg.value @ alpha_t - 1 / (alpha_t + 1e-10)
            if np.linalg.norm(residual) < 1e-3:
                break
            if np.linalg.norm(alpha.value - alpha_prev.value) < 1e-6:
                break
            alpha_t = alpha.value
        return alpha_t

    def forward(self, matrix: Tensor, /) -> Tensor:
        if matrix.shape[0] != self.n_tasks:
            raise ValueError(
                f"Parameter `matrix` should have n_tasks = {self.n_tasks} rows (one per task). "
                f"Found `matrix.shape = {matrix.shape}`."
            )
        # Exact-reference path: eager, CPU/numpy, synchronises (documented exception).
        if int(self.step) % self.update_weights_every == 0:
            gramian = matrix @ matrix.T
            nu = torch.linalg.matrix_norm(gramian)  # Frobenius, in the input dtype (as torchjd)
            if not bool(torch.isfinite(nu)) or float(nu) == 0.0:
                raise ValueError(
                    "NashMTL needs a Gramian with a finite, non-zero Frobenius norm. Found "
                    f"{float(nu)} (a zero Jacobian, or an overflow in {matrix.dtype})."
                )
            if self._problem is None:
                self._build_problem()
            _, _, _, gtg_param, nu_param = self._problem
            # Host round trip into cvxpy: the documented eager-only exception (class docstring).
            gtg = (gramian / nu).detach().to(torch.float64).cpu()
            self.gtg.copy_(gtg)
            self.normalization_factor.fill_(float(nu))
            gtg_param.value = gtg.numpy().copy()
            nu_param.value = self.normalization_factor.numpy().copy()
            self.step += 1
            alpha = self._solve(self.prvs_alpha.numpy().copy())
            if alpha is not None:
                self.prvs_alpha.copy_(torch.as_tensor(alpha, dtype=torch.float64))
        else:
            self.step += 1
        # A copy: the buffer is updated in place later, the returned weights must not change.
        alpha = self.prvs_alpha.to(dtype=matrix.dtype, device=matrix.device, copy=True)
        if self.max_norm > 0:
            norm = torch.linalg.vector_norm(alpha @ matrix)
            alpha = torch.where(norm > self.max_norm, alpha * self.max_norm / norm, alpha)
        return alpha


class NashMTL(WeightedAggregator, Stateful):
    r"""Nash-MTL (Navon et al., 2022, *Multi-Task Learning as a Bargaining Game*): the weights
    :math:`\alpha > 0` solve the Nash bargaining condition :math:`G\alpha = 1/\alpha`
    (element-wise), with :math:`G = J J^\top`, and the update is :math:`\alpha^\top J`.

    Every ``update_weights_every`` calls, :math:`\alpha` is recomputed from the current Jacobian
    by a sequence of at most ``optim_niter`` convex problems (a concave-convex procedure). With
    :math:`\nu = \|G\|_F`, :math:`\hat G = G/\nu` and the previous iterate
    :math:`\alpha_{t}`, each problem is

    .. math::
        \min_{\alpha \ge 0}\ \mathbb{1}^\top \hat G \alpha
        + \frac{1}{\nu}\Big(\frac{1}{\alpha_t} + \hat G\,\frac{1}{\hat G \alpha_t}\Big)^{\!\top}
        (\alpha - \alpha_t)
        \quad \text{s.t.} \quad -\log(\nu\alpha_i) - \log((\hat G\alpha)_i) \le 0\ \ \forall i,

    solved by cvxpy with ECOS (at most 100 iterations; a failed solve keeps :math:`\alpha_t`).
    The sequence stops when the previous iterate already satisfies
    :math:`\|\hat G\alpha_t - 1/(\alpha_t + 10^{-10})\| < 10^{-3}` or when a step moves less
    than :math:`10^{-6}` (the previous iterate is kept), or after ``optim_niter`` problems (if
    the first linearised problem is unbounded, which happens when :math:`\hat G\alpha_t` has a
    negative entry, :math:`\alpha` keeps its previous value, as in torchjd). On
    the other calls the stored :math:`\alpha` is reused. Finally, if ``max_norm > 0`` and
    :math:`\|\alpha^\top J\| >` ``max_norm``, :math:`\alpha` is rescaled so that
    :math:`\|\alpha^\top J\| =` ``max_norm``.

    **Not sync-free, not compilable:** this is the exact reference of torchjd, eager-only, run
    on the CPU in numpy/cvxpy (a documented exception to jdoptim's sync-free rule). It needs
    ``pip install "jdoptim[nash_mtl]"`` (cvxpy and ecos); constructing it without them raises
    :class:`ImportError`.

    Stateful: ``state_dict()`` / ``load_state_dict()`` carry the step counter, the last
    :math:`\alpha`, :math:`\nu` and :math:`\hat G`, so a restored instance continues the same
    sequence; :meth:`reset` restores the initial state. Not differentiable.

    Args:
        n_tasks: Number of objectives ``m`` (rows of the Jacobian), positive.
        max_norm: Maximum norm of the update (``0`` disables the rescaling), non-negative.
        update_weights_every: Recompute :math:`\alpha` every this many calls, positive.
        optim_niter: Maximum number of convex problems per recomputation, positive.

    >>> import torch
    >>> NashMTL(n_tasks=2)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0542, 0.7061, 0.7061])
    """

    differentiable = False
    n_tasks = Param(forward="weighting")
    max_norm = Param(forward="weighting")
    update_weights_every = Param(forward="weighting")
    optim_niter = Param(forward="weighting")

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        weighting = _NashMTLWeighting(n_tasks, max_norm, update_weights_every, optim_niter)
        _check_deps(type(self).__name__)
        super().__init__(weighting)

    def reset(self) -> None:
        self.weighting.reset()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(n_tasks={self.n_tasks}, max_norm={self.max_norm}, "
            f"update_weights_every={self.update_weights_every}, "
            f"optim_niter={self.optim_niter})"
        )
