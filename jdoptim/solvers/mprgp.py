r"""The batched MPRGP solver of the dual-cone QPs (``solver="mprgp"``, the default before the
exact solver of :mod:`jdoptim.solvers.active_set`).

MPRGP (modified proportioning with reduced gradient projections, Dostál & Schöberl 2005) is
conjugate gradients on the current face of the feasible set, with projected-gradient
*expansion* steps that add bounds and *proportioning* steps that release them. All ``k`` rows
advance together; each iteration is a single ``[k, m] @ [m, m]`` product plus element-wise work.
It runs a fixed number of iterations (:func:`default_iterations`, a heuristic): near
Pareto-stationarity the regularised Gramian has a condition number up to ``1/reg_eps`` and the
budget can run out before convergence, **silently**. Kept for comparison and for explicit
``n_iters`` budgets; prefer ``solver="torch"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._eager_compile import eager_compiled
from ._loop import bounded_loop

_GAMMA = 1.0
"""MPRGP proportioning parameter: a step releases bounds when the chopped gradient exceeds
``_GAMMA`` times the reduced free gradient."""


def default_iterations(m: int) -> int:
    r"""Fixed MPRGP iteration count for ``m`` objectives, :math:`\lceil 30 + 20\sqrt m \rceil`
    (a static function of the shape; chosen with margin on the accuracy bank of the tests).

    >>> default_iterations(2), default_iterations(64), default_iterations(256)
    (59, 190, 350)
    """
    return math.ceil(30 + 20 * math.sqrt(m))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def mprgp_solve(
    gramian: Tensor,
    lower: Tensor,
    n_iters: int | None = None,
    init: Tensor | None = None,
    rel_tol: float | None = None,
) -> Tensor:
    r"""Solve :math:`\min_v \tfrac12 v^\top \hat G v` s.t. :math:`v \geq u` for every row ``u`` of
    ``lower`` (``[k, m]``) with a batched, fixed-iteration MPRGP; returns ``[k, m]``.

    ``gramian`` must be symmetric positive definite (e.g. regularised). Both inputs should be
    float64 for an accurate result. ``init`` (``[k, m]``, optional) warm-starts the iterations
    from :math:`\max(\text{init}, u)`, e.g. the previous step's solution. Starting from
    :math:`v = u` (or the warm start), each row takes, per iteration,
    one of: a conjugate-gradient step on its free set (if it stays feasible), an *expansion* step
    (the longest feasible CG step, then a projected-gradient step of length
    :math:`\bar\alpha = 1.9 / \min(\text{Gershgorin}, \operatorname{tr})`), a *proportioning* step
    along the chopped gradient (releasing bounds whose multiplier is negative), or, right after an
    expansion, a gradient refresh. Only one matrix product is spent per iteration for all rows.

    With the default budget (``n_iters=None``) on the CPU, a float64 problem of size
    ``m >= FLOAT32_FIRST_MIN_M`` is first solved in float32 (stopping at a projected gradient
    of ``1e-6`` of the bounds) and the result warm-starts the float64 iterations, which stop at
    ``1e-10``: the solution is the float64 one, reached with fewer float64 products. On an
    accelerator every iteration of the budget runs (no early exit), so there a float32 phase
    would only add work and is skipped. An explicit ``n_iters`` runs float64 only. ``rel_tol``
    (default ``1e-10``) sets the early exit of the float64 iterations.

    >>> import torch
    >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    >>> mprgp_solve(G, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """
    if n_iters is None:
        n_iters = default_iterations(gramian.shape[-1])
        if _float32_first(gramian):
            start = None if init is None else init.to(torch.float32)
            init = _mprgp(gramian.float(), lower.float(), n_iters, start, _TOL_FLOAT32)
    return _mprgp(gramian, lower, n_iters, init, _TOL_FLOAT64 if rel_tol is None else rel_tol)


_TOL_FLOAT64 = 1e-10
"""Early exit of the float64 iterations: projected gradient below this times ``max|u|``."""

_TOL_FLOAT32 = 1e-6
"""Early exit of the float32 first phase (about ten float32 ulps of the bounds' scale)."""

FLOAT32_FIRST_MIN_M = 32
"""Smallest ``m`` for which :func:`mprgp_solve` (default budget, float64, CPU) runs a float32
first phase."""


def _float32_first(gramian: Tensor) -> bool:
    """Whether to start with float32 iterations: on the CPU, where both phases stop early (an
    accelerator runs every iteration of a fixed budget, so a second phase would only add
    work), for float64 problems large enough that the cheaper products outweigh a second
    kernel call."""
    return (
        gramian.device.type == "cpu"
        and gramian.dtype == torch.float64
        and gramian.shape[-1] >= FLOAT32_FIRST_MIN_M
    )


def _start(lower: Tensor, init: Tensor | None) -> Tensor:
    if init is None:
        return lower.clone()
    # Entries within rounding of their bound start *on* it: a gap of 1e-20 would make them
    # free and send the first steps away from an otherwise converged warm start.
    init = init.to(lower.dtype)
    return torch.where(init - lower > 1e-12 * lower.abs().amax(), init, lower)


def _step(
    gramian: Tensor,
    lower: Tensor,
    abar: Tensor,
    x: Tensor,
    grad: Tensor,
    direction: Tensor,
    stale: Tensor,
    outlier: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One MPRGP iteration of every row (one ``[k, m] @ [m, m]`` product). Returns the new
    ``x``, gradient, direction, the rows that took an expansion step (float, their gradient is
    then stale) and the projected gradient. ``outlier``: see :func:`_expansion`."""
    # Element-wise work uses float masks (torch.sign of the non-negative gap x - u) and
    # column-wise torch.where only: full-size boolean masks are several times slower on CPU.
    gap = x - lower
    free = torch.sign(gap)
    phi = grad * free  # free gradient
    beta = (grad - phi).clamp(max=0.0)  # chopped gradient
    phi_reduced = torch.minimum(gap * (1.0 / abar), phi)
    proportional = _rowdot(beta, beta) <= _GAMMA**2 * _rowdot(phi_reduced, phi)
    refresh = stale > 0
    # Rows whose gradient is stale (after an expansion) spend the product on x itself.
    s = torch.where(refresh, x, torch.where(proportional, direction, beta))
    a_s = s @ gramian
    s_a_s = _rowdot(s, a_s)
    alpha_cg = _safe_div(_rowdot(grad, s), s_a_s)
    # Longest feasible step along -s: 1 / max_j (s_j / gap_j) over s_j > 0 (a `where`, not
    # nan_to_num: Inductor's CPU code tests isnan element by element).
    rates = torch.where(s > 0, s / gap, 0.0)
    alpha_feasible = 1.0 / rates.amax(-1, keepdim=True)
    cg = ~refresh & proportional & (alpha_cg <= alpha_feasible)
    expand = ~refresh & proportional & ~cg
    alpha = torch.where(expand, alpha_feasible, torch.where(refresh, 0.0, alpha_cg))
    x_new = x - alpha * s
    grad_new = torch.where(refresh, a_s, grad - alpha * a_s)
    # Expansion: a projected-gradient step from the feasible boundary point.
    x_new = torch.where(expand, _expansion(lower, abar, x_new, grad_new, outlier), x_new)
    phi_new = grad_new * torch.sign(x_new - lower)
    gamma = _safe_div(_rowdot(phi_new, a_s), s_a_s)
    direction_new = torch.where(cg, phi_new - gamma * direction, phi_new)
    projected_gradient = phi_new + (grad_new - phi_new).clamp(max=0.0)
    return x_new, grad_new, direction_new, expand.to(x.dtype), projected_gradient


def _expansion(
    lower: Tensor,
    abar: Tensor,
    x: Tensor,
    grad: Tensor,
    outlier: tuple[Tensor, Tensor, Tensor] | None,
) -> Tensor:
    r"""MPRGP's expansion step :math:`x_p = \max(x - \bar\alpha \varphi, u)` (:math:`\varphi`
    the free gradient). With ``outlier = (q, l1, l2)``, estimates of the top eigenpair
    :math:`(\lambda_1, q)` and of :math:`\lambda_2` of a Gramian whose top eigenvalue stands
    out (:math:`\bar\alpha \approx 1.9/\lambda_1` then barely moves the other directions), a
    second candidate steps along the free gradient with its component along the free part of
    :math:`q` removed, :math:`x_d = \max(x - c\, d/\lambda_2, u)` (:math:`c` =
    :data:`DEFLATED_STEP`); each row takes the candidate
    whose upper bound of the change of the objective, :math:`g^\top\delta + \tfrac12
    (\lambda_2\|\delta\|^2 + (\lambda_1 - \lambda_2)(q^\top\delta)^2)` (from
    :math:`\hat G \preceq \lambda_2 I + (\lambda_1 - \lambda_2) q q^\top`), is smaller.
    Measured on ``aligned_conflict`` at m = 1000: 655 -> 375 float32 iterations (with
    :math:`c = 1`), 9.7 -> 3.9 s per ``UPGradWeighting`` call (with :math:`c = 0.5`)."""
    free = torch.sign(x - lower)
    phi = grad * free
    plain = torch.maximum(x - abar * phi, lower)
    if outlier is None:
        return plain
    q, l1, l2 = outlier
    q_free = q * free
    d = phi - _safe_div(_rowdot(q_free, phi), _rowdot(q_free, q_free)) * q_free
    deflated = torch.maximum(x - (DEFLATED_STEP / l2) * d, lower)

    def bound(step: Tensor) -> Tensor:
        q_step = _rowdot(step, q)
        return _rowdot(grad, step) + 0.5 * (l2 * _rowdot(step, step) + (l1 - l2) * q_step**2)

    return torch.where(bound(deflated - x) < bound(plain - x), deflated, plain)


def _expansion_step(gramian: Tensor, lipschitz: Tensor | None = None) -> Tensor:
    """``1.9 / L`` (a 0-d tensor) with ``L`` the upper bound min(Gershgorin, trace) of
    ``lambda_max``, or ``lipschitz`` when given and smaller."""
    bound = torch.minimum(gramian.abs().sum(-1).amax(), gramian.diagonal().sum())
    if lipschitz is not None:
        bound = torch.minimum(bound, lipschitz.to(bound.dtype))
    return 1.9 / torch.where(bound > 0, bound, torch.ones_like(bound))


@eager_compiled
def _mprgp(
    gramian: Tensor, lower: Tensor, n_iters: int, init: Tensor | None, rel_tol: float
) -> Tensor:
    """The MPRGP iterations of :func:`mprgp_solve` (``n_iters`` given; on the CPU they stop once
    the projected gradient is below ``rel_tol * max|u|``). Eager calls run a compiled kernel
    (:mod:`jdoptim.solvers._eager_compile`)."""
    # Step of the projected-gradient (expansion) steps: 1.9 / an upper bound of lambda_max.
    abar = _expansion_step(gramian)
    x = _start(lower, init)
    grad = x @ gramian
    direction = torch.zeros_like(x)
    stale = torch.zeros_like(x[..., :1])
    # Early exit (CPU only, see bounded_loop): the projected gradient of every row is below
    # `tol`. With the ridge, |v - v*| <= |projected gradient| / reg_eps, so 1e-10 of the bounds'
    # scale (float64) keeps the weights far inside the 1e-5 accuracy contract (checked on the
    # test bank).
    tol = rel_tol * lower.abs().amax()
    done = torch.zeros((), dtype=torch.bool, device=x.device)

    def body(
        x: Tensor, grad: Tensor, direction: Tensor, stale: Tensor, done: Tensor
    ) -> tuple[Tensor, ...]:
        x, grad, direction, stale, projected_gradient = _step(
            gramian, lower, abar, x, grad, direction, stale
        )
        done = ~(stale > 0).any() & (projected_gradient.abs().amax() <= tol)
        return x, grad, direction, stale, done

    x = bounded_loop(n_iters, body, (x, grad, direction, stale, done), done_index=4)[0]
    return torch.maximum(x, lower)


@eager_compiled
def _mprgp_chunk(
    gramian: Tensor,
    lower: Tensor,
    x: Tensor,
    grad: Tensor,
    direction: Tensor,
    stale: Tensor,
    abar: Tensor,
    tol: Tensor,
    n_iters: int,
    euclidean: bool,
    outlier: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """At most ``n_iters`` MPRGP iterations from the given state (CPU: stops once every row is
    done); returns the new state and the ``[k]`` mask of the rows done (no expansion in the last
    iteration and projected gradient at most ``tol``, ``[k, 1]``, in the 2-norm if ``euclidean``,
    else the max-norm)."""
    row_done = torch.zeros_like(stale, dtype=torch.bool)

    def body(
        x: Tensor, grad: Tensor, direction: Tensor, stale: Tensor, row_done: Tensor, done: Tensor
    ) -> tuple[Tensor, ...]:
        x, grad, direction, stale, projected_gradient = _step(
            gramian, lower, abar, x, grad, direction, stale, outlier
        )
        if euclidean:
            size = projected_gradient.square().sum(-1, keepdim=True).sqrt()
        else:
            size = projected_gradient.abs().amax(-1, keepdim=True)
        row_done = (stale <= 0) & (size <= tol)
        return x, grad, direction, stale, row_done, row_done.all()

    done = torch.zeros((), dtype=torch.bool, device=x.device)
    carry = (x, grad, direction, stale, row_done, done)
    x, grad, direction, stale, row_done, _ = bounded_loop(n_iters, body, carry, done_index=5)
    return x, grad, direction, stale, row_done.squeeze(-1)


def halfspace_start(gramian: Tensor, lower: Tensor) -> Tensor:
    r"""A feasible start for MPRGP on the CPU: :math:`\max(u, v_h)` for every row ``u`` of
    ``lower`` (``[k, m]``), with :math:`v_h = \frac{u^\top u}{u^\top \hat G^{-1} u}
    \hat G^{-1} u` the minimiser of :math:`\tfrac12 v^\top \hat G v` on the half-space
    :math:`u^\top v \ge u^\top u` (for UPGrad's rows :math:`u = p_i e_i`: the solution with
    only the row's own bound active); ``u`` itself where :math:`u^\top \hat G^{-1} u` is not
    positive. One Cholesky factorisation and solve (``m^3/6 + k m^2`` multiply-adds).
    Measured at m = 1000 (1 thread, per ``UPGradWeighting`` call, start at ``u`` / here, both
    with a float32 phase to ``1e-6``): ``aligned_conflict`` 3.9 / 2.6 s;
    ``random`` and ``lowrank`` within 5% (the other kinds' rows, and the float32 tolerance of
    :data:`SHRINKING_TOL_FLOAT32`: ``bench/RESULTS.md`` §7i). ``gramian`` must be positive
    definite; where it is not (not finite, say) the start is ``u``.

    >>> import torch
    >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    >>> halfspace_start(G, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """
    factor, info = torch.linalg.cholesky_ex(gramian)
    if int(info) != 0:  # CPU only: reading the flag costs no synchronisation
        return lower.clone()
    direction = torch.cholesky_solve(lower.mT, factor).mT  # rows G^-1 u
    curvature = (lower * direction).sum(-1, keepdim=True)
    positive = curvature > 0  # u^T G^-1 u = 0 only for u = 0 (G positive definite)
    scale = lower.square().sum(-1, keepdim=True) / torch.where(positive, curvature, 1.0)
    return torch.where(positive, torch.maximum(lower, scale * direction), lower)


SHRINK_CHUNK = 8
"""Iterations of :func:`mprgp_shrinking` between two removals of the rows done."""


DEFLATED_STEP = 1.0
"""Step of the deflated expansion candidate of :func:`_expansion`, times ``1 / lambda_2``.
Measured on ``aligned_conflict`` at m = 1000 (per ``UPGradWeighting`` call): from
:func:`halfspace_start`, 2.39 s at 0.35, 2.15 s at 0.5, 1.91 s at 0.7, 1.84 s at 1, 1.77 s at
1.3, 2.05 s at 1.6 (from ``u``, before: 3.9 s at 0.5, 5.1 s at 1); 1 against 0.5: m = 256-400
7-10% faster, the ``conflict`` and ``conflict_lowdim`` kinds at m = 1000 within 3%, ``rank2``
7% slower, the test families at m = 400 within noise."""

SHRINKING_TOL_FLOAT32 = 1e-8
"""A row leaves the float32 phase of :func:`mprgp_shrinking` once ``max|g| <= SHRINKING_TOL_FLOAT32
max|U|`` (the fixed-budget :func:`mprgp_solve` keeps ``1e-6``). Rows that float32's rounding
keeps above it run to the phase's iteration budget, alone in a shrunken batch (cheap), and the
float64 phase finishes them either way. Measured (1 thread, per ``UPGradWeighting`` call,
with :func:`halfspace_start`; 1e-6 / 1e-7 / 1e-8): ``aligned_conflict`` at m = 1000 2.59 / 2.23
/ 2.17 s, ``random`` 1.63 / 1.55 / 1.47 s, ``lowrank`` 4.20 / 3.93 / 3.85 s, W2's per-sample
Gramians at B = 1024 7.0 / - / 6.1 s; the Pareto-stationary, duplicated, opposite and
rank-deficient families at m = 400 within 10%."""

OUTLIER_RATIO = 10.0
""":func:`mprgp_shrinking` takes the deflated expansion steps of :func:`_expansion` when the
estimated ``lambda_1 / lambda_2`` exceeds this (one eigenvalue stands out: Gramians of
conflicting but aligned gradients)."""


def mprgp_shrinking(
    gramian: Tensor,
    lower: Tensor,
    init: Tensor | None,
    rel_tol: float,
    spectrum: tuple[Tensor, Tensor, Tensor] | None = None,
    n_iters: int | None = None,
) -> Tensor:
    """MPRGP on the CPU (eager; reads row flags, free there) where each row leaves the batch
    once it meets its stopping test (checked every :data:`SHRINK_CHUNK` iterations), so the
    ``[k, m] @ [m, m]`` products shrink as rows converge. The float64 iterations stop a row
    once its projected gradient ``g`` has ``||g||_2 <= rel_tol ||u||_2``. Float64 problems of
    ``m >= FLOAT32_FIRST_MIN_M`` start with a float32 phase (as in :func:`mprgp_solve`; a row
    leaves it at ``max|g| <= SHRINKING_TOL_FLOAT32 max|U|``). ``spectrum`` (optional):
    estimates ``(lambda_1, lambda_2, q)`` of the top eigenvalues and eigenvector of ``gramian``
    (:func:`~jdoptim.solvers.lanczos.top_pair_estimate`): expansion steps of ``1.9 /
    lambda_1`` instead of 1.9 / Gershgorin, and deflated ones (:func:`_expansion`, float32
    phase only: measured slower in the float64 one) when ``lambda_1 > OUTLIER_RATIO
    lambda_2``. Any estimate is safe for the result, which the caller checks. Each phase runs
    at most ``n_iters`` iterations (default :func:`default_iterations`)."""
    if n_iters is None:
        n_iters = default_iterations(gramian.shape[-1])
    lipschitz, outlier = None, None
    if spectrum is not None:
        l1, l2, q = spectrum
        lipschitz = l1
        if float(l1) > OUTLIER_RATIO * float(l2):
            outlier = (q, l1, l2)
    if _float32_first(gramian):
        start = None if init is None else init.to(torch.float32)
        bounds = lower.float()
        tol = (SHRINKING_TOL_FLOAT32 * bounds.abs().amax()).expand(bounds.shape[0], 1)
        low = None if outlier is None else tuple(t.float() for t in outlier)
        init = _shrinking(gramian.float(), bounds, start, tol, False, lipschitz, low, n_iters)
    # The float64 phase starts near the solution, where deflated steps measured slower.
    tol = rel_tol * lower.norm(dim=-1, keepdim=True)
    return _shrinking(gramian, lower, init, tol, True, lipschitz, None, n_iters)


def _shrinking(
    gramian: Tensor,
    lower: Tensor,
    init: Tensor | None,
    tol: Tensor,
    euclidean: bool,
    lipschitz: Tensor | None,
    outlier: tuple[Tensor, ...] | None,
    n_iters: int,
) -> Tensor:
    k = lower.shape[0]
    abar = _expansion_step(gramian, lipschitz)
    x = _start(lower, init)
    grad = x @ gramian
    # The free gradient: a zero direction would spend the first conjugate-gradient step (and
    # its product) on nothing when the start is already proportional (a warm start).
    direction = grad * torch.sign(x - lower)
    # Contiguous state: the compiled loop's carry must keep its strides (a [1, 1] slice of a
    # [1, m] tensor has strides (m, 1)).
    x, grad, direction = x.contiguous(), grad.contiguous(), direction.contiguous()
    stale = x.new_zeros(k, 1)
    tol = tol.contiguous()
    out = torch.empty_like(lower)
    rows, bounds = torch.arange(k), lower
    spent = 0
    while spent < n_iters and rows.numel() > 0:
        steps = min(SHRINK_CHUNK, n_iters - spent)
        spent += steps
        state = (bounds, x, grad, direction, stale)
        if rows.numel() >= 2:  # batch sizes stay symbolic (size 1 would be specialised)
            for t in (*state, tol):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        x, grad, direction, stale, done = _mprgp_chunk(
            gramian, *state, abar, tol, steps, euclidean, outlier
        )
        n_done = int(done.sum())
        if n_done == rows.numel():
            break
        if n_done == 0 or rows.numel() - n_done < 2:
            continue
        out[rows[done]] = torch.maximum(x[done], bounds[done])
        keep = ~done
        rows, bounds, x, grad, tol = rows[keep], bounds[keep], x[keep], grad[keep], tol[keep]
        direction, stale = direction[keep], stale[keep]
    out[rows] = torch.maximum(x, bounds)
    return out
