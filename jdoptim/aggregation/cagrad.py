r"""CAGrad: conflict-averse gradient descent (Liu et al., 2021)."""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import Tensor

from jdoptim.solvers.simplex import minimize_linear_plus_norm

from ._base import GramianWeightedAggregator, Param, Weighting
from ._gramian import check_norm_eps, normalize, trace_threshold

Solver = Literal["torch", "cvxpy"]
_SOLVERS = ("torch", "cvxpy")
_CVXPY_DEPS = ("numpy", "cvxpy", "clarabel")


def _check_c(c: float) -> float:
    if c < 0:
        raise ValueError(f"c must be non-negative, but got {c}.")
    return c


_RHO_EPS = 1e-4
"""Threshold on the normalised update norm ``rho`` when ``norm_eps=None`` (torchjd's value; rho
is computed from the trace-normalised Gramian, so this threshold is already scale-free)."""


def _check_norm_eps(norm_eps: float | None) -> float | None:
    check_norm_eps(norm_eps)
    return norm_eps


def _rho_eps(norm_eps: float | None) -> float:
    return _RHO_EPS if norm_eps is None else norm_eps


def _check_solver(solver: str, owner: str) -> str:
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, but got {solver!r}.")
    if solver == "cvxpy":
        missing = [name for name in _CVXPY_DEPS if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(
                f"{owner} with solver='cvxpy' requires {missing} to be installed. Install them "
                f'with: pip install "jdoptim[cagrad]"'
            )
    return solver


def _cvxpy_weights(gramian_n: Tensor, c: float, norm_eps: float | None) -> Tensor:
    """The exact reference: a factor ``R`` with ``R R^T = G_n`` from an SVD, then cvxpy/CLARABEL.

    Eager-only and CPU/numpy: this path synchronises by design (allowed exception to the
    sync-free rule, like ``solver="quadprog"`` elsewhere).
    """
    # Exact reference path (solver="cvxpy"): numpy/cvxpy on the CPU, eager only, syncs.
    import cvxpy as cp
    import numpy as np

    m = gramian_n.shape[0]
    u, sigma, _ = torch.svd(gramian_n)
    factor = (u * sigma.sqrt()).to(torch.float64).cpu().numpy()
    g0 = factor.T @ np.ones(m) / m
    phi = c * float(np.linalg.norm(g0))
    w = cp.Variable(m)
    objective = cp.Minimize((factor @ g0) @ w + phi * cp.norm(factor.T @ w))
    cp.Problem(objective, [w >= 0, cp.sum(w) == 1]).solve(solver=cp.CLARABEL)
    w_star = np.asarray(w.value, dtype=np.float64)
    rho = float(np.linalg.norm(factor.T @ w_star))
    if rho >= _rho_eps(norm_eps):  # exact-reference path: Python branching on values is fine here
        weights = np.ones(m) / m + phi / rho * w_star
    else:
        weights = np.zeros(m)
    return torch.as_tensor(weights, dtype=gramian_n.dtype, device=gramian_n.device)


def cagrad_weights(gramian: Tensor, c: float, norm_eps: float | None, n_iters: int = 100) -> Tensor:
    r"""CAGrad weights of a Gramian with the pure-torch solver (see :class:`CAGradWeighting`).

    Solved in float64 and cast back to ``gramian``'s dtype; sync-free and compilable. The
    Gramian is divided by its trace (``norm_eps=None``: unless the trace is below the smallest
    normal number of ``gramian``'s dtype), so scaling it by a power of two does not change the
    weights.

    >>> import torch
    >>> cagrad_weights(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]), c=0.5, norm_eps=1e-4)
    tensor([0.7041, 0.5000])
    """
    m = gramian.shape[0]
    gramian_n = normalize(gramian.to(torch.float64), trace_threshold(gramian.dtype, norm_eps))
    ones = torch.ones(m, dtype=torch.float64, device=gramian.device)
    linear = gramian_n @ ones / m
    phi = c * (ones @ linear / m).clamp(min=0).sqrt()  # c ||g0|| = c sqrt(1'G_n 1) / m
    w = minimize_linear_plus_norm(gramian_n, linear, phi, n_iters)
    rho = (w @ gramian_n @ w).clamp(min=0).sqrt()
    rho_eps = _rho_eps(norm_eps)
    keep = rho >= rho_eps
    weights = ones / m + phi / torch.where(keep, rho, 1.0) * w
    if c >= 1:  # static: c is a Python float
        # For c >= 1 and a Pareto-stationary point the optimum is not unique, but every optimum
        # gives the zero direction; return exactly zero then (see CAGradWeighting's notes).
        keep = keep & ((weights @ gramian_n @ weights).clamp(min=0).sqrt() >= rho_eps)
    return torch.where(keep, weights, 0.0).to(gramian.dtype)


class CAGradWeighting(Weighting):
    r"""Weights of CAGrad (Liu et al., 2021, *Conflict-Averse Gradient Descent for Multi-task
    Learning*), computed from the Gramian :math:`G = J J^\top`.

    Let :math:`G_n = G / \operatorname{tr}(G)` (or :math:`0` if :math:`\operatorname{tr}(G) <`
    ``norm_eps``; for ``norm_eps=None``, the default, if it is below the smallest normal number
    of the dtype), :math:`g_0 = J_n^\top \mathbb{1}/m` the mean normalised gradient and
    :math:`\varphi = c\|g_0\| = c\sqrt{\mathbb{1}^\top G_n \mathbb{1}}/m`. CAGrad looks for the
    update :math:`d` maximising the worst improvement :math:`\min_i g_i^\top d` in the ball
    :math:`\|d - g_0\| \le \varphi`. Its dual is

    .. math::
        w^\star = \arg\min_{w \in \Delta_m}\ \frac{w^\top G_n \mathbb{1}}{m}
        + \varphi \sqrt{w^\top G_n w},

    and with :math:`\rho = \sqrt{w^{\star\top} G_n w^\star}` the weights are

    .. math::
        \frac{1}{m}\mathbb{1} + \frac{\varphi}{\rho}\, w^\star \quad \text{if } \rho \ge
        \texttt{norm\_eps}, \qquad 0 \text{ otherwise}

    They are computed from the normalised Gramian but applied to the raw :math:`J`, so the
    aggregation scales linearly with :math:`J`. ``c = 0`` gives the mean and :math:`m = 1`
    gives the weight :math:`1 + c`.

    Args:
        c: Radius of the ball around the mean gradient, relative to its norm (``c >= 0``).
        norm_eps: Threshold on :math:`\operatorname{tr}(G)` and on :math:`\rho` (``>= 0``).
            ``None`` (default): the trace threshold is the dtype's smallest normal number
            (scale-invariant) and the threshold on the scale-free :math:`\rho` is ``1e-4``
            (torchjd's); ``1e-4`` gives torchjd's absolute threshold on the trace.
        solver: ``"torch"`` (default) solves the dual in float64 with
            :func:`~jdoptim.solvers.simplex.minimize_linear_plus_norm`, a fixed-iteration
            interior-point method: no host synchronisation, captured by ``torch.compile``.
            ``"cvxpy"`` is the reference of torchjd (an SVD factor of :math:`G_n` and
            cvxpy/CLARABEL, on the CPU, eager only; needs ``pip install "jdoptim[cagrad]"``).

    Notes:
        * The torch solver is more exact than the reference: CLARABEL stops at a relative gap
          of 1e-8, which on flat problems leaves the weights off by up to ~5e-4 (e.g.
          ``c = 0.5`` on the ``J_Krum`` test matrix); the torch solver matches the exact
          (KKT-verified) optimum to ~1e-7 relative or better.
        * For ``c >= 1`` the dual optimum can be non-unique when a combination of the
          gradients points against :math:`g_0` (e.g. at a Pareto-stationary point); every
          optimum then gives :math:`d = 0`, and the torch solver returns zero weights whenever
          the normalised update :math:`\|J_n^\top w\|` is below ``norm_eps``.
        * Not differentiable: runs under :func:`torch.no_grad`.

    >>> import torch
    >>> CAGradWeighting(c=0.5)(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.7041, 0.5000])
    """

    differentiable = False
    c = Param(_check_c)
    norm_eps = Param(_check_norm_eps)
    solver = Param(lambda solver: _check_solver(solver, "CAGrad"))

    def __init__(self, c: float, norm_eps: float | None = None, solver: Solver = "torch") -> None:
        super().__init__()
        self.c = c
        self.norm_eps = norm_eps
        self.solver = solver

    def forward(self, gramian: Tensor, /) -> Tensor:
        if self.solver == "cvxpy":
            gramian_n = normalize(gramian, trace_threshold(gramian.dtype, self.norm_eps))
            return _cvxpy_weights(gramian_n, self.c, self.norm_eps)
        return cagrad_weights(gramian, self.c, self.norm_eps)


class CAGrad(GramianWeightedAggregator):
    r"""Aggregator :math:`J \mapsto w^\top J` with the weights of :class:`CAGradWeighting`.

    Args:
        c: Radius of the ball around the mean gradient, relative to its norm (``c >= 0``).
        norm_eps: Threshold on :math:`\|J\|_F^2` and on the norm of the dual solution
            (``None``: scale-invariant, see :class:`CAGradWeighting`).
        solver: ``"torch"`` (default, sync-free, compilable) or ``"cvxpy"`` (the reference).

    >>> import torch
    >>> CAGrad(c=0.5)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1835, 1.2041, 1.2041])
    """

    differentiable = False
    c = Param(forward="gramian_weighting")
    norm_eps = Param(forward="gramian_weighting")
    solver = Param(forward="gramian_weighting")

    def __init__(self, c: float, norm_eps: float | None = None, solver: Solver = "torch") -> None:
        super().__init__(CAGradWeighting(c, norm_eps=norm_eps, solver=solver))

    def __repr__(self) -> str:
        suffix = "" if self.solver == "torch" else f", solver={self.solver!r}"
        return f"{self.__class__.__name__}(c={self.c}, norm_eps={self.norm_eps}{suffix})"

    def __str__(self) -> str:
        c_str = f"{self.c}"
        return f"CAGrad{c_str.removesuffix('.0')}"
