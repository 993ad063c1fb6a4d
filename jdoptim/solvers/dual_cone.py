r"""Projection onto the dual cone of a Gramian: a batch of bound-constrained QPs.

Given a Gramian :math:`G \in \mathbb{R}^{m \times m}` and a matrix of lower bounds
:math:`U \in \mathbb{R}^{k \times m}`, with :math:`\hat G = G / \operatorname{tr}(G) +
\varepsilon_r I` (:mod:`jdoptim.solvers.normalization`), every row :math:`u` of :math:`U` is
mapped to

.. math::

    v^\star = \operatorname*{arg\,min}_{v \in \mathbb{R}^m} \tfrac12 v^\top \hat G v
    \quad \text{subject to} \quad v \geq u,

characterised by the KKT conditions :math:`\lambda = \hat G v^\star \geq 0`,
:math:`v^\star \geq u` and :math:`\lambda \odot (v^\star - u) = 0`. With :math:`G = J J^\top`,
:math:`J^\top v^\star` is the projection of :math:`J^\top u` onto the dual cone
:math:`\{x : Jx \geq 0\}` (up to the ridge).

Three solvers:

* ``"torch"`` (default): on the CPU for small ``m`` and per-sample Gramians
  (:data:`NATIVE_MAX_M`), a primal active-set method compiled from C
  (:mod:`jdoptim.solvers.native`), each row certified;
  otherwise exact block principal pivoting on one shared Cholesky factor, with a
  polish of proven rate (:mod:`jdoptim.solvers.active_set`). Its accuracy does not depend on
  the conditioning: on the CPU it runs until the KKT conditions hold to rounding; on an
  accelerator it runs a fixed budget, sync-free and capturable by
  ``torch.compile(fullgraph=True)``, whose accuracy (:math:`\|v - v^\star\|_2 \le 10^{-9}
  \|u\|_2`) is proven for every Gramian the ridge allows. On the CPU it is a custom operator
  (``torch.ops.jdoptim.dual_cone_cpu``): compiled graphs call it as one opaque kernel.
* ``"mprgp"``: the former default, a fixed budget of MPRGP iterations
  (:mod:`jdoptim.solvers.mprgp`). Its budget is a heuristic: near Pareto-stationarity it can
  stop before convergence. Kept for comparison.
* ``"quadprog"``: the reference (Goldfarb-Idnani dual active set through ``qpsolvers``), one
  QP per row on the CPU in numpy. It synchronises and cannot be compiled.

The solvers run in float64 whatever the input's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import native
from .active_set import (
    POLISH_RTOL,
    certify,
    initial_active,
    pivot_limit,
    pivot_padded,
    solve_cpu,
    solve_fixed,
    try_pivoting,
)
from .lanczos import top_pair_estimate
from .mprgp import halfspace_start, mprgp_shrinking, mprgp_solve
from .normalization import normalized_ridge, trace_threshold

Solver = Literal["torch", "mprgp", "quadprog"]
SOLVERS: tuple[str, ...] = ("torch", "mprgp", "quadprog")


def check_solver(solver: str) -> None:
    """Raise ``ValueError`` unless ``solver`` is one of :data:`SOLVERS`."""
    if solver not in SOLVERS:
        raise ValueError(
            f"Parameter `solver` must be one of {SOLVERS}. Found `solver = {solver!r}`."
        )


def check_non_negative(name: str, value: float | None) -> None:
    """Raise ``ValueError("{name} must be non-negative, but got {value}.")`` if ``value < 0``
    (``None`` is accepted)."""
    if value is not None and value < 0:
        raise ValueError(f"{name} must be non-negative, but got {value}.")


def condition_bound(reg_eps: float) -> float:
    r"""Upper bound of the condition number of :math:`\hat G = G/\operatorname{tr}(G) +
    \varepsilon_r I` over every Gramian: :math:`(1 + \varepsilon_r)/\varepsilon_r`, with a
    margin of :math:`10^{-6}` for the rounding of the trace.

    >>> round(condition_bound(1e-4))
    10001
    """
    return (1.0 + reg_eps) / reg_eps * (1.0 + 1e-6)


PIVOT_FIRST_STEPS = 8
PIVOT_FIRST_MAX_M = 256
PIVOT_FIRST_MIN_SIZE = 32
"""On the CPU, for ``m <= PIVOT_FIRST_MAX_M``, pivoting runs first, for at most
``PIVOT_FIRST_STEPS`` steps and while every system has at most :func:`pivot_first_size`
unknowns; the rows left go to MPRGP. Measured (2026-11-30, 1 thread, median ms per
``UPGradWeighting`` call, pivoting first vs MPRGP first): systems of up to 32 unknowns are
cheaper to pivot on (m = 32: 1.9 vs 2.4-2.9 on W4/W5's per-sample Gramians, 2.0-2.8 vs 2.3-4.4 on
the test bank's families; m = 64: 5.4-7.7 vs 7.6-10.7, except Gaussian rows 5.6 vs 4.7); larger
ones only when they stay below about m/4 (W2 at m = 256: 47 vs 81), since the batched
factorisations of ``k`` systems of size ``m/2`` are memory-bound on the CPU (80-100 ms a step at
m = 256, where MPRGP takes 40-250 ms)."""


def pivot_first_size(m: int, first: int | None = None) -> int:
    """Largest system pivoting may solve before handing over to MPRGP (see
    :data:`PIVOT_FIRST_MAX_M`), given the size ``first`` of the largest first system:
    ``max(PIVOT_FIRST_MIN_SIZE, 3m // 8)`` when ``first <= m // 5`` (see
    :data:`PIVOT_FIRST_SMALL_START`), else ``max(PIVOT_FIRST_MIN_SIZE, 2m // 7)``.

    >>> pivot_first_size(64), pivot_first_size(256), pivot_first_size(256, 40)
    (32, 73, 96)
    """
    if first is not None and first <= m // PIVOT_FIRST_SMALL_START:
        return max(PIVOT_FIRST_MIN_SIZE, 3 * m // 8)
    return max(PIVOT_FIRST_MIN_SIZE, 2 * m // 7)


PIVOT_FIRST_SMALL_START = 5
"""Pivoting first may go on to systems of ``3m/8`` unknowns (instead of ``2m/7``) when every
first system has at most ``m / PIVOT_FIRST_SMALL_START`` unknowns: per-sample Gramians start
small and stay moderate (W2 at m = 256: first systems of at most 39-47 unknowns, last ones of
55-81, done in 4-5 steps), while the Gramians whose first systems are already large grow to
``m/2`` (the test bank's ``aligned_conflict``: 85, then 128; Gaussian rows: 128 at once), where
MPRGP is cheaper. Measured (2026-11-30, 1 thread, median ms per ``UPGradWeighting`` call at
m = 256, cap ``2m/7`` against ``3m/8`` for every Gramian): W2 72.7 / 50.8 (two of its four
Gramians need systems of 74-81), ``aligned_conflict`` 84 / 127, the other families within 2%;
this rule keeps the first for those and the second for W2."""


NATIVE_MAX_M = 160
NATIVE_ACTIVE_MAX_M = 256
NATIVE_ACTIVE_FRACTION = 3
"""On the CPU, for ``m <= NATIVE_MAX_M``, and up to ``NATIVE_ACTIVE_MAX_M`` when every row's
guessed active set has at most ``m / NATIVE_ACTIVE_FRACTION`` bounds (per-sample Gramians), the
rows are solved by the compiled primal active-set method of :mod:`jdoptim.solvers.native` when
it is available; the torch solver takes the rows it does not finish or certify. Measured
(2026-12-01, 1 thread, median ms per ``UPGradWeighting`` call, native / torch solver): the test
bank's kinds at m = 96 2.2-7.0 / 7.0-17.6, m = 128 4.7-17 / 6.2-27, m = 160 8.1-35 / 11-42,
m = 192 15-59 / 14-61 (mixed), m = 256 49-184 / 26-120 (hence the limit); W2's per-sample
Gramians (few active bounds) m = 64 0.56, m = 128 1.8, m = 256 13 / 47; warm-started from the
previous solution (whose active sets, about m/4, the Newton guess at u underestimates) m = 256
9.3 / 20.7; the test bank's guessed active sets are about m/2 there."""

PADDED_PIVOT_MAX_M = 32
"""On the CPU, for ``m <= PADDED_PIVOT_MAX_M`` and once the process has made
:data:`PADDED_PIVOT_AFTER_CALLS` such calls, the whole pivoting runs as one compiled loop with
systems padded to ``m // 2`` (:func:`~jdoptim.solvers.active_set.pivot_padded`); measured,
2-3.5x faster than the eager pivoting at m = 8-32, where per-operation dispatch dominates."""

NARROW_PIVOT_MAX_M = 64
NARROW_PIVOT_SIZE = 16
NARROW_PIVOT_START = 12
"""For ``PADDED_PIVOT_MAX_M < m <= NARROW_PIVOT_MAX_M``, when every row's first system has at
most ``NARROW_PIVOT_START`` unknowns (per-sample Gramians: about m/6 bounds are free or active),
the compiled loop runs with systems padded to ``NARROW_PIVOT_SIZE`` instead of ``m // 2``;
a row whose system outgrows that is left to the eager solver. Measured (2026-11-30, W2's
per-sample Gramians at m = 64, final systems of 10-16 unknowns): 1.35 ms against 2.0 ms for
the eager pivoting and 3.9 ms padded to m // 2 (then after PADDED_PIVOT_AFTER_CALLS calls,
like the small-m loop)."""

PADDED_PIVOT_AFTER_CALLS = 1000
"""Calls of the CPU solver that could run the compiled loop (:func:`_padded_size`) and run the
eager pivoting before the compiled loop takes over. Compiling the loop costs about 5 s once per
process and saves 0.3-1 ms a call, so it pays off only after several thousand calls: short
scripts, tests and demos never compile it, long training runs do (the two take the same steps;
results agree to rounding)."""

_small_calls = [0]  # calls made so far that could run the compiled loop (this process)

MPRGP_FIRST_TOL = 1e-13
"""Exit of each row from the MPRGP first phase on the CPU: its projected gradient ``g`` has
``||g||_2 <= MPRGP_FIRST_TOL ||u||_2`` (:func:`~jdoptim.solvers.mprgp.mprgp_shrinking`). With
the default ridge that is the bound :func:`~jdoptim.solvers.active_set.certify` needs
(``||g|| / reg_eps <= 1e-9 ||u||``): measured, every row of the test bank's families at m = 256
is certified."""


def _padded_size(gramian: Tensor, lower: Tensor, init: Tensor | None) -> int | None:
    """Padding of the compiled pivoting loop for this call (CPU), or ``None`` (eager path):
    ``m // 2`` up to :data:`PADDED_PIVOT_MAX_M`, :data:`NARROW_PIVOT_SIZE` up to
    :data:`NARROW_PIVOT_MAX_M` when the first systems are small enough."""
    m = lower.shape[-1]
    if m <= PADDED_PIVOT_MAX_M:
        return m // 2
    if m > NARROW_PIVOT_MAX_M:
        return None
    n_active = initial_active(gramian, lower, init).sum(-1)
    first = int(torch.minimum(n_active, m - n_active).amax())  # CPU: no sync
    return NARROW_PIVOT_SIZE if first <= NARROW_PIVOT_START else None


@torch.library.custom_op("jdoptim::dual_cone_cpu", mutates_args=())
def _dual_cone_cpu(
    gramian: Tensor, lower: Tensor, init: Tensor | None, mu: float, kappa: float
) -> Tensor:
    return _dual_cone_cpu_eager(gramian, lower, init, mu, kappa)


def _dual_cone_cpu_eager(
    gramian: Tensor, lower: Tensor, init: Tensor | None, mu: float, kappa: float
) -> Tensor:
    # The operator's body: called directly in eager mode (it saves the operator's dispatch,
    # 0.06-0.3 ms a call), through the operator when compiling (an opaque node in the graph).
    # CPU only: host reads of the certificate are free here (no device to synchronise with).
    with torch.no_grad():
        m = lower.shape[-1]
        start = products = None
        if m <= NATIVE_ACTIVE_MAX_M and native.available():
            # The free sets guessed by a Newton step's rule; rows with few active bounds solve
            # their faces from the active side (per-sample Gramians: |A| ~ m/8).
            products = _bound_products(lower, gramian)
            if init is None:  # the rule at v0 = u (initial_active), with the product kept
                start = products <= 0
            else:
                start = ~initial_active(gramian, lower, init)
            if m > NATIVE_MAX_M and m - int(start.sum(-1).amin()) > m // NATIVE_ACTIVE_FRACTION:
                start = None  # CPU: no sync
        if start is None:
            return _torch_cpu(gramian, lower, init, mu, kappa)
        # The compiled active-set method (a fresh tensor); the rows it does not finish, or that
        # fail the certificate, go to the torch solver.
        x, done = native.solve(gramian, lower, start, products)
        finished = done & native.certify(gramian, lower, x, mu, POLISH_RTOL)
        if not bool(finished.all()):
            rest = ~finished
            again = None if init is None else init[rest]
            x[rest] = _torch_cpu(gramian, lower[rest], again, mu, kappa)
    return x


DIAGONAL_PRODUCT_MIN_M = 128
"""From this ``m`` on, :func:`_bound_products` looks for diagonal bounds (measured at m = 256:
the product takes 0.45 ms, the test and the scaling 0.04 ms; at m = 64 the product costs less
than the test)."""


def _bound_products(lower: Tensor, gramian: Tensor) -> Tensor:
    """``lower @ gramian``; for UPGrad's bounds ``diag(p)`` (square, diagonal) as
    ``p[:, None] * gramian``: the same bits (every other term of the product is an exact zero)
    for an O(m^2) pass instead of O(m^3)."""
    k, m = lower.shape
    if k == m >= DIAGONAL_PRODUCT_MIN_M:
        p = lower.diagonal()
        if torch.equal(lower, torch.diag(p)):  # CPU: no sync
            return p[:, None] * gramian
    return lower @ gramian


def _torch_cpu(gramian: Tensor, lower: Tensor, init: Tensor | None, mu: float, kappa: float):
    """The torch solver on the CPU (a fresh, normal tensor). Inference mode with fresh copies:
    the compiled MPRGP kernel then sees inputs of the same kind (dispatch keys) whether the
    operator runs eagerly or inside a compiled graph."""
    with torch.inference_mode():
        gramian, lower = gramian.clone(), lower.clone()
        init = None if init is None else init.clone()
        x = _torch_cpu_solve(gramian, lower, init, mu, kappa)
    return x.clone()  # a normal tensor (inference tensors cannot be saved for backward)


def _torch_cpu_solve(
    gramian: Tensor, lower: Tensor, init: Tensor | None, mu: float, kappa: float
) -> Tensor:
    """The CPU solve in torch operations (in inference mode, see :func:`_torch_cpu`)."""
    # Pivoting first while its systems stay small (then it beats MPRGP); MPRGP (rows leave its
    # batch as they converge), the certificate and pivoting for the rows it leaves.
    m = lower.shape[-1]
    size = _padded_size(gramian, lower, init)
    if size is not None:
        _small_calls[0] += 1
    if size is not None and _small_calls[0] > PADDED_PIVOT_AFTER_CALLS:
        # One compiled loop: at small m the eager pivoting is dispatch-bound.
        x, undone = pivot_padded(gramian, lower, init, pivot_limit(m), size)
        if bool(undone.any()):  # never seen: finite pivoting, then the proven polish
            x[undone] = solve_cpu(gramian, lower[undone], mu, kappa, None)
        return x
    if m <= PIVOT_FIRST_MAX_M:
        x, undone, _ = try_pivoting(
            gramian,
            lower,
            init,
            PIVOT_FIRST_STEPS,
            lambda first: pivot_first_size(m, first),
            False,
        )
    else:  # no pivoting first: its active-set guess alone costs a product
        x, undone = lower.clone(), torch.ones(lower.shape[0], dtype=torch.bool)
    if bool(undone.any()):
        rest = lower[undone]
        # A cold start from the half-space minimisers (see halfspace_start).
        start = halfspace_start(gramian, rest) if init is None else init[undone]
        # Expansion steps from estimates of the top of the spectrum (see mprgp_shrinking).
        spectrum = top_pair_estimate(gramian)
        y = mprgp_shrinking(gramian, rest, start, MPRGP_FIRST_TOL, spectrum)
        uncertified = ~certify(gramian, rest, y, mu, POLISH_RTOL)
        if bool(uncertified.any()):
            y[uncertified] = solve_cpu(gramian, rest[uncertified], mu, kappa, y[uncertified])
        x[undone] = y
    return x


@_dual_cone_cpu.register_fake
def _(gramian: Tensor, lower: Tensor, init: Tensor | None, mu: float, kappa: float) -> Tensor:
    return torch.empty_like(lower)


def solve_dual_cone(g_hat: Tensor, lower: Tensor, reg_eps: float, init: Tensor | None = None):
    r"""Solve :math:`\min_v \tfrac12 v^\top \hat G v` s.t. :math:`v \ge u` for every row of
    ``lower`` (``[k, m]``, float64) with the exact solver, where ``g_hat`` (float64) is a
    trace-normalised Gramian plus the ridge ``reg_eps > 0``. ``init`` (optional, ``[k, m]``)
    seeds the active sets (a warm start). On the CPU: the custom operator
    (:func:`~jdoptim.solvers.active_set.solve_cpu`); elsewhere the sync-free fixed budget
    (:func:`~jdoptim.solvers.active_set.solve_fixed`).

    >>> import torch
    >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    >>> solve_dual_cone(G, torch.tensor([[1.0, 0.0]], dtype=torch.float64), reg_eps=0.5)
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """
    kappa = condition_bound(reg_eps)
    if init is not None:
        init = init.to(lower.dtype)
    if g_hat.device.type == "cpu":
        if torch.compiler.is_compiling():
            return _dual_cone_cpu(g_hat, lower, init, reg_eps, kappa)
        return _dual_cone_cpu_eager(g_hat, lower, init, reg_eps, kappa)
    return solve_fixed(g_hat, lower, reg_eps, kappa, init)


def _quadprog_solve(gramian: Tensor, lower: Tensor) -> Tensor:
    # Exact reference path: numpy on the CPU, one QP per row (synchronises; not compilable).
    import numpy as np
    from qpsolvers import solve_qp

    P = gramian.detach().cpu().numpy().astype(np.float64)
    m = P.shape[0]
    q = np.zeros(m)
    G = -np.eye(m)
    rows = []
    for u in lower.detach().cpu().numpy().astype(np.float64).reshape(-1, m):
        v = solve_qp(P, q, G, -u, solver="quadprog")
        if v is None:
            raise ValueError("Failed to solve the quadratic programming problem.")
        rows.append(v)
    out = np.array(rows).reshape(lower.shape)
    return torch.as_tensor(out, dtype=torch.float64, device=lower.device)


def project_weights(
    U: Tensor,
    G: Tensor,
    *,
    norm_eps: float | None = None,
    reg_eps: float = 1e-4,
    solver: Solver = "torch",
    n_iters: int | None = None,
    init: Tensor | None = None,
) -> Tensor:
    r"""Project every row of ``U`` (``[..., m]``) onto the dual cone of the Gramian ``G``.

    Computes :math:`\hat G = \operatorname{regularize}(\operatorname{normalize}(G,
    \varepsilon_n), \varepsilon_r)` in float64, then solves, for every row
    :math:`u` of ``U``: :math:`\min_v \tfrac12 v^\top \hat G v` s.t. :math:`v \geq u`. The result
    has ``U``'s shape and ``G``'s dtype and device. Multiplying ``G`` by a power of two leaves
    :math:`\hat G`, hence the result, bitwise unchanged (for ``norm_eps=None``, until the trace
    is below the dtype's smallest normal number: see :mod:`jdoptim.solvers.normalization`).

    :param U: lower bounds (weights to project), shape ``[..., m]``.
    :param G: the Gramian :math:`J J^\top`, shape ``[m, m]``.
    :param norm_eps: below this trace, :math:`\hat G` is :math:`\varepsilon_r I`; ``None``
        (default): below the smallest normal number of ``G``'s dtype (scale-invariant).
    :param reg_eps: ridge added to the normalised Gramian. With ``reg_eps = 0`` the problem
        can be singular and ``"torch"`` runs the ``"mprgp"`` iterations instead.
    :param solver: ``"torch"`` (exact, sync-free, compilable), ``"mprgp"`` (fixed heuristic
        budget) or ``"quadprog"`` (reference, CPU numpy).
    :param n_iters: iteration count of the ``"mprgp"`` solver (default:
        :func:`~jdoptim.solvers.mprgp.default_iterations`).
    :param init: optional warm start (same shape as ``U``), e.g. the previous call's result:
        it seeds the active sets of ``"torch"`` and starts ``"mprgp"``; same solution.

    >>> import torch
    >>> G = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
    >>> project_weights(torch.eye(2) / 2, G)
    tensor([[0.5000, 0.2894],
            [0.6109, 0.5000]])
    """
    check_solver(solver)
    threshold = trace_threshold(G.dtype, norm_eps)
    g_hat = normalized_ridge(G.to(torch.float64), threshold, reg_eps)
    lower = U.to(dtype=torch.float64, device=G.device)
    shape = lower.shape
    lower = lower.reshape(-1, shape[-1])
    start = None if init is None else init.reshape(lower.shape)
    if solver == "quadprog":
        out = _quadprog_solve(g_hat, lower)
    elif solver == "mprgp" or reg_eps == 0:
        out = mprgp_solve(g_hat, lower, n_iters, init=start)
    else:
        out = solve_dual_cone(g_hat, lower, reg_eps, init=start)
    return out.reshape(shape).to(dtype=G.dtype)
