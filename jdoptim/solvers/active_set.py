r"""Exact batched solver of bound-constrained QPs: block principal pivoting on a shared factor.

For a symmetric positive-definite :math:`\hat G \in \mathbb{R}^{m \times m}` and bounds
:math:`U \in \mathbb{R}^{k \times m}`, every row :math:`u` of :math:`U` gets

.. math::

    v^\star = \operatorname*{arg\,min}_{v \geq u} \tfrac12 v^\top \hat G v,
    \qquad \lambda = \hat G v^\star \geq 0, \quad v^\star \geq u, \quad
    \lambda \odot (v^\star - u) = 0.

**Active-set (Newton) iterations.** For a guess :math:`A` of the active set (the bounds that
hold with equality), the minimiser on the face :math:`\{v_A = u_A\}` has :math:`\lambda_F = 0`
on the free set :math:`F`. With :math:`H = \hat G^{-1}` (one Cholesky factorisation,
:math:`m^3/3`, shared by every row), it is the solution of *either*

* :math:`H_{AA} \lambda_A = u_A`, then :math:`v = H_{:,A} \lambda_A` (a system of size
  :math:`|A|`, the Schur complement of :math:`H`), *or*
* :math:`\hat G_{FF} v_F = -\hat G_{FA} u_A`, :math:`v_A = u_A`, :math:`\lambda = \hat G v`
  (size :math:`|F|`);

each row takes the smaller, so no system is larger than :math:`\lfloor m/2 \rfloor`. The
infeasible indices (:math:`\lambda_i < 0` on :math:`A`, :math:`v_i < u_i` on :math:`F`) then
change sides all at once (a semismooth Newton / primal-dual active-set step). This alone can
cycle when :math:`\hat G` is not an M-matrix (it does on weakly Pareto-stationary Jacobians), so
the exchange follows the *block principal pivoting* rule of Júdice & Pires (1994): a full
exchange while the number of infeasibilities reaches a new minimum, at most
:data:`BLOCK_TRIES` non-improving full exchanges, then single exchanges of the largest
infeasible index (Murty's rule) until the count improves. For a positive-definite
:math:`\hat G` this terminates, in exact arithmetic, at the exact solution, after finitely many
steps (Murty's rule is finite on P-matrix complementarity problems), usually 2 to 8. A row is
done when no index is infeasible beyond :data:`KKT_RTOL` of its scale.

Finite is not bounded: the worst case of pivoting rules is exponential in :math:`m`. So the
result of the pivoting phase is handed to a method with a proven rate, :func:`apg_polish`: it
leaves an exact solution unchanged and otherwise converges at a rate that holds for every input
the ridge allows (see there).

**Where it runs.** On the CPU (:func:`solve_cpu`) host reads are free: the pivoting runs until
every row is done (converged rows leave the batch; the others are solved in one or two batches
by system size, each padded to its largest system), and only rows still undone after
:func:`pivot_limit` steps (never seen in the tests) go to the polish, which stops once its
error certificate is met. On an accelerator (:func:`solve_fixed`) nothing is read back:
:func:`accelerator_pivots` pivoting steps with systems padded to :math:`\lfloor m/2 \rfloor`,
then the polish for its full proven budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._eager_compile import eager_compiled
from ._loop import bounded_loop

BLOCK_TRIES = 3
"""Non-improving full exchanges allowed before single (Murty) exchanges (Júdice & Pires)."""

KKT_RTOL = 1e-11
"""A row is solved when ``lambda_A >= -KKT_RTOL * s * max|G|`` and ``v_F >= u_F - KKT_RTOL * s``
with ``s = max|u|``: rounding-level violations of a degenerate solution are not pivoted on."""

POLISH_RTOL = 1e-9
r"""Accuracy the polish guarantees: :math:`\|v - v^\star\|_2 \le 10^{-9} \|u\|_2`."""


def pivot_limit(m: int) -> int:
    """Pivoting steps on the CPU before undone rows go to the polish (far above the 2-8 steps
    seen on every test family; the polish makes any limit safe).

    >>> pivot_limit(64)
    276
    """
    return 4 * m + 20


def accelerator_pivots(m: int) -> int:
    """Pivoting steps on an accelerator (fixed: no host read), before the proven polish.

    >>> accelerator_pivots(2), accelerator_pivots(256)
    (14, 28)
    """
    return 10 + 2 * math.ceil(math.log2(m + 1))


def polish_iterations(kappa: float, rtol: float = POLISH_RTOL) -> int:
    r"""Iterations :math:`N` after which :func:`apg_polish` is within ``rtol`` for every input
    with condition number at most ``kappa``: the smallest :math:`N` with
    :math:`2\kappa (1 - 1/\sqrt\kappa)^N \le \text{rtol}^2`.

    >>> polish_iterations((1 + 1e-4) / 1e-4)
    5110
    """
    q = 1.0 - 1.0 / math.sqrt(kappa)
    if q <= 0.0:
        return 1
    return max(1, math.ceil(math.log(2.0 * kappa / rtol**2) / -math.log(q)))


def _lipschitz_bound(gramian: Tensor, mu: float) -> Tensor:
    """An upper bound of the largest eigenvalue of a matrix ``>= mu I``, as a 0-d tensor:
    min(Gershgorin, trace - (m - 1) mu)."""
    m = gramian.shape[-1]
    trace_bound = gramian.diagonal().sum() - (m - 1) * mu
    return torch.minimum(gramian.abs().sum(-1).amax(), trace_bound)


def extended_pair(gramian: Tensor, inverse: Tensor) -> Tensor:
    """``[2 (m+1)^2]``: ``inverse`` then ``gramian``, each bordered by a zero row and column
    (a virtual index ``m``), flattened. Padding positions gather index ``m``: zero rows and
    columns, whose diagonal :func:`_face_solve` then sets to one."""
    m = gramian.shape[-1]
    pair = torch.zeros(2, m + 1, m + 1, dtype=gramian.dtype, device=gramian.device)
    pair[0, :m, :m] = inverse
    pair[1, :m, :m] = gramian
    return pair.reshape(-1)


ALIASED_MIN = 128
"""On the CPU, batched face systems whose size is a multiple of 64, from 128 on, get one more
padding row (identity, so the same solution): measured (2026-11-30, MKL through
``torch.linalg.cholesky_ex``, 256 matrices, float64), sizes 128 / 192 / 256 take 52 / 88 /
180 ms to factorise and sizes 129 / 193 / 257 take 26 / 65 / 118 ms (rows a multiple of 512
bytes apart alias in the cache)."""


def _face_solve(
    gramian: Tensor,
    inverse: Tensor,
    lower: Tensor,
    active: Tensor,
    size: int,
    pair: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimiser ``v`` and multipliers ``lambda`` of every row on its face ``{v_A = u_A}``,
    through the smaller of the two systems (see the module docstring), padded to ``size``.
    ``pair`` is :func:`extended_pair` of ``gramian`` and ``inverse`` (computed if ``None``)."""
    k, m = lower.shape
    size = max(1, min(size, m))
    if size >= ALIASED_MIN and size % 64 == 0 and size < m and lower.device.type == "cpu":
        size += 1  # one more identity row: see ALIASED_MIN
    if pair is None:
        pair = extended_pair(gramian, inverse)
    n_active = active.sum(-1, keepdim=True)
    dual = 2 * n_active <= m  # solve H_AA lambda_A = u_A, else G_FF v_F = -G_FA u_A
    chosen = torch.where(dual, active, ~active)
    count = chosen.sum(-1, keepdim=True)
    # The chosen indices first (stable: in increasing order), then the others; padding
    # positions take the virtual index m (then identity rows and columns, zero right-hand side).
    order = torch.argsort((~chosen).to(torch.int32), dim=-1, stable=True)[..., :size]
    valid = torch.arange(size, device=lower.device) < count
    index = torch.where(valid, order, m)
    base = torch.where(dual, 0, (m + 1) * (m + 1))
    matrices = pair[base[..., None] + index[..., :, None] * (m + 1) + index[..., None, :]]
    matrices.diagonal(dim1=-2, dim2=-1).add_((~valid).to(matrices.dtype))  # identity padding
    bound_part = torch.where(active, lower, 0.0)
    rhs = torch.where(dual, lower, -(bound_part @ gramian))
    rhs = torch.cat([rhs, torch.zeros_like(rhs[..., :1])], -1).gather(-1, index)
    factor = torch.linalg.cholesky_ex(matrices)[0]
    # Two triangular solves: several times faster than cholesky_solve on batches (CPU).
    y = torch.linalg.solve_triangular(factor, rhs.unsqueeze(-1), upper=False)
    x = torch.linalg.solve_triangular(factor.mT, y, upper=True).squeeze(-1)
    full = lower.new_zeros(k, m + 1).scatter(-1, index, x)[..., :m]
    # Dual side: `full` holds lambda_A; primal side: it holds v_F.
    lam_dual = torch.where(active, full, 0.0)
    v_primal = torch.where(active, lower, full)
    v = torch.where(dual, torch.where(active, lower, lam_dual @ inverse), v_primal)
    lam = torch.where(dual, lam_dual, torch.where(active, v_primal @ gramian, 0.0))
    return v, lam


BUCKET_MIN_SIZE = 40
"""Systems of fewer unknowns are solved in one padded batch (measured: splitting costs more
than the padding it saves at m = 64, and saves 15-20% on W2's Gramians at m = 256)."""


def _bucketed_face_solve(
    gramian: Tensor, inverse: Tensor, lower: Tensor, active: Tensor, sizes: Tensor, pair: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_face_solve` (CPU, eager) with the rows split in two by system size when that
    saves padding: the ``[k, s, s]`` gathers and factorisations cost about ``k s^2`` memory
    traffic, so rows whose systems are much smaller than the largest are solved apart (the
    split point minimises ``k_1 s_1^2 + k_2 s_2^2``). Same result as one padded batch."""
    k = lower.shape[0]
    largest = int(sizes.amax())
    if k < 16 or largest < BUCKET_MIN_SIZE:  # small systems: the second call costs more
        return _face_solve(gramian, inverse, lower, active, largest, pair)
    ordered, _ = torch.sort(sizes)
    counts = torch.arange(1, k + 1, dtype=torch.float64)  # rows with size <= ordered[i]
    cost = counts * ordered.double() ** 2 + (k - counts) * float(largest) ** 2
    best = int(torch.argmin(cost))
    split = int(ordered[best])
    # Split only when it saves at least a fifth of the padded batch's traffic.
    if float(cost[best]) > 0.8 * k * float(largest) ** 2 or split >= largest:
        return _face_solve(gramian, inverse, lower, active, largest, pair)
    small = sizes <= split
    v, lam = torch.empty_like(lower), torch.empty_like(lower)
    for rows, size in ((small, split), (~small, largest)):
        v[rows], lam[rows] = _face_solve(gramian, inverse, lower[rows], active[rows], size, pair)
    return v, lam


def _infeasible(
    v: Tensor, lam: Tensor, lower: Tensor, active: Tensor, gramian_scale: Tensor
) -> Tensor:
    scale = lower.abs().amax(-1, keepdim=True)
    return torch.where(
        active, lam < -KKT_RTOL * scale * gramian_scale, v - lower < -KKT_RTOL * scale
    )


def _exchange(
    active: Tensor, bad: Tensor, best: Tensor, tries: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One block-principal-pivoting exchange (Júdice-Pires safeguard, see the module)."""
    m = active.shape[-1]
    n_bad = bad.sum(-1, keepdim=True)
    improved = n_bad < best
    best = torch.minimum(best, n_bad)
    tries = torch.where(improved, BLOCK_TRIES, tries - 1)
    last = m - 1 - bad.flip(-1).to(torch.int32).argmax(-1, keepdim=True)
    single = torch.zeros_like(bad).scatter(-1, last, True) & bad
    pivot = torch.where(tries >= 0, bad, single)
    return active ^ pivot, best, tries


def initial_active(gramian: Tensor, lower: Tensor, init: Tensor | None) -> Tensor:
    """Active-set guess from the start ``v0 = max(init, u)`` (or ``u``): the indices with
    ``lambda0_i > v0_i - u_i``, ``lambda0 = G v0`` (a Newton step's rule)."""
    v0 = lower if init is None else torch.maximum(init.to(lower.dtype), lower)
    return (v0 @ gramian) > (v0 - lower)


def _objective(gramian: Tensor, x: Tensor) -> Tensor:
    return 0.5 * ((x @ gramian) * x).sum(-1, keepdim=True)


def best_start(gramian: Tensor, lower: Tensor, v: Tensor) -> Tensor:
    """``max(v, u)`` where its objective is at most that of ``u``, else ``u`` (row-wise):
    a feasible start no worse than ``u``, which the polish's bound needs."""
    x = torch.maximum(v, lower)
    return torch.where(_objective(gramian, x) <= _objective(gramian, lower), x, lower)


@eager_compiled
def apg_polish(gramian: Tensor, lower: Tensor, start: Tensor, mu: float, n_iters: int) -> Tensor:
    r"""Accelerated projected gradient with constant momentum (V-FISTA) from a feasible
    ``start`` whose objective is at most that of ``lower``.

    With :math:`\mu \le \lambda_{\min}(\hat G)` (the ridge), :math:`L` = min(Gershgorin,
    :math:`\operatorname{tr}\hat G - (m-1)\mu`) :math:`\ge \lambda_{\max}(\hat G)` (for a
    trace-normalised Gramian plus the ridge, :math:`L \le 1 + \mu`) and :math:`\kappa = L/\mu`,
    the steps
    :math:`x^+ = \max(y - \hat G y / L, u)`, :math:`y^+ = x^+ + \beta (x^+ - x)`,
    :math:`\beta = (\sqrt\kappa - 1)/(\sqrt\kappa + 1)` satisfy (Beck, *First-Order Methods in
    Optimization*, 2017, Thm 10.42) :math:`f(x_N) - f^\star \le (1 - 1/\sqrt\kappa)^N
    (f(x_0) - f^\star + \tfrac\mu2 \|x_0 - x^\star\|^2)`. With strong convexity and
    :math:`f(x_0) \le f(u) \le \tfrac L2 \|u\|^2`, :math:`f^\star \ge 0`:

    .. math::

        \|x_N - x^\star\|_2^2 \le 2 \kappa (1 - 1/\sqrt\kappa)^N \|u\|_2^2,

    so :func:`polish_iterations` of :math:`\kappa` iterations give :math:`\|x_N - x^\star\|_2
    \le 10^{-9} \|u\|_2`. On the CPU the loop stops early once, for every row, the certificate
    :math:`\|x - x^\star\| \le 2\kappa \|x - \max(x - \hat G x / L, u)\|` (the natural
    residual bound of a strongly monotone problem) is below that accuracy. An exact ``start``
    is a fixed point.
    """
    lipschitz = _lipschitz_bound(gramian, mu)
    lipschitz = torch.where(lipschitz > 0, lipschitz, torch.ones_like(lipschitz))
    kappa = (lipschitz / mu).clamp(min=1.0)
    beta = (kappa.sqrt() - 1) / (kappa.sqrt() + 1)
    target = POLISH_RTOL * lower.norm(dim=-1, keepdim=True)

    def body(x: Tensor, y: Tensor, done: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_new = torch.maximum(y - (y @ gramian) / lipschitz, lower)
        y_new = x_new + beta * (x_new - x)
        residual = x_new - torch.maximum(x_new - (x_new @ gramian) / lipschitz, lower)
        done = (2 * kappa * residual.norm(dim=-1, keepdim=True) <= target).all()
        return x_new, y_new, done

    done = torch.zeros((), dtype=torch.bool, device=lower.device)
    return bounded_loop(n_iters, body, (start.clone(), start.clone(), done), done_index=2)[0]


def solve_fixed(
    gramian: Tensor, lower: Tensor, mu: float, kappa: float, init: Tensor | None = None
) -> Tensor:
    """Sync-free solve (any device, compilable): :func:`accelerator_pivots` pivoting steps with
    systems padded to ``m // 2``, then :func:`apg_polish` for ``polish_iterations(kappa)``
    iterations. ``gramian`` (``[m, m]``) and ``lower`` (``[k, m]``) float64; ``mu`` a lower
    bound of the eigenvalues of ``gramian`` and ``kappa`` an upper bound of
    ``lambda_max_bound / mu`` (see :func:`apg_polish`)."""
    k, m = lower.shape
    inverse = torch.cholesky_inverse(torch.linalg.cholesky_ex(gramian)[0])
    gramian_scale = gramian.abs().amax()
    active = initial_active(gramian, lower, init)
    best = torch.full((k, 1), m + 1, dtype=torch.int64, device=lower.device)
    tries = torch.full((k, 1), BLOCK_TRIES, dtype=torch.int64, device=lower.device)
    pair = extended_pair(gramian, inverse)
    v = lower
    for _ in range(accelerator_pivots(m)):
        v, lam = _face_solve(gramian, inverse, lower, active, m // 2, pair)
        bad = _infeasible(v, lam, lower, active, gramian_scale)
        active, best, tries = _exchange(active, bad, best, tries)
    start = best_start(gramian, lower, v)
    return apg_polish(gramian, lower, start, mu, polish_iterations(kappa))


def certify(gramian: Tensor, lower: Tensor, x: Tensor, mu: float, rtol: float) -> Tensor:
    r"""Rows ``x`` (feasible, ``x >= u``) proven within ``rtol * ||u||_2`` of the solution.

    Entries within :math:`\sigma` of their bound are snapped onto it (:math:`x \to x_s`). With
    :math:`e_i = (\hat G x_s)_i` where :math:`x_{s,i} > u_i` and :math:`\min((\hat G x_s)_i,
    0)` where :math:`x_{s,i} = u_i`, :math:`x_s` solves the problem with linear term
    :math:`-e` exactly (KKT with :math:`\lambda = \hat G x_s - e \ge 0`), and the solution is
    :math:`1/\mu`-Lipschitz in that term, so :math:`\|x - x^\star\|_2 \le \|x - x_s\|_2 +
    \|e\|_2 / \mu`. Returns a ``[k]`` boolean tensor: that bound is at most
    ``rtol * ||u||_2``.
    """
    norm = torch.linalg.vector_norm  # not Tensor.norm: its Python wrapper costs a few us a call
    # Rows scaled by 2^-e, 2^e <= max|u_i| (exact; the bound is linear in u and x; max|x_i| for
    # u = 0): the norms' squares then neither overflow nor underflow (unscaled, |u| ~ 2^-600
    # gave a target and a bound of 0, and |u| ~ 2^600 a target of inf: any x passed).
    top = lower.abs().amax(-1, keepdim=True)
    top = torch.where(top > 0, top, x.abs().amax(-1, keepdim=True))
    exponent = torch.frexp(top).exponent.clamp(min=-1000)
    scale = torch.ldexp(torch.ones_like(lower[:, :1]), 1 - exponent)
    lower, x = lower * scale, x * scale
    target = rtol * norm(lower, dim=-1)
    sigma = target[:, None] * (1e-3 / math.sqrt(max(1, x.shape[-1])))
    gap = x - lower
    at_bound = gap <= sigma  # sigma >= 0: elsewhere x_s = x > u (NaN: not at the bound)
    snapped = torch.where(at_bound, lower, x)
    grad = snapped @ gramian
    e = torch.where(at_bound, grad.clamp(max=0.0), grad)
    bound = torch.add(norm(torch.where(at_bound, gap, 0.0), dim=-1), norm(e, dim=-1), alpha=1 / mu)
    return bound <= target


def solve_cpu(
    gramian: Tensor, lower: Tensor, mu: float, kappa: float, init: Tensor | None = None
) -> Tensor:
    """The CPU solve (eager; reads row counts and flags from tensors, free on the CPU): pivot
    until every row is done, converged rows leaving the batch (see
    :func:`_bucketed_face_solve` for the padding); rows undone after :func:`pivot_limit`
    steps are polished (:func:`apg_polish`, stopping at its certificate). Same arguments as
    :func:`solve_fixed`."""
    out, undone, start = try_pivoting(gramian, lower, init, pivot_limit(lower.shape[-1]))
    if bool(undone.any()):
        # Undone after the limit (finite pivoting can in theory take exponentially many steps).
        out[undone] = apg_polish(gramian, lower[undone], start, mu, polish_iterations(kappa))
    return out


@eager_compiled
def pivot_padded(
    gramian: Tensor, lower: Tensor, init: Tensor | None, n_steps: int, size: int | None = None
) -> tuple[Tensor, Tensor]:
    """At most ``n_steps`` pivoting steps with every system padded to ``size`` (default
    ``m // 2``, the largest possible) and every row kept in the batch (done rows stop
    changing): one compiled kernel for the whole loop, which stops once every row is done
    (CPU; see :func:`~jdoptim.solvers._loop.bounded_loop`). A row whose next system would
    exceed ``size`` stops there, undone. Returns the solution on the rows that are done and the
    ``[k]`` mask of the rows that are not (their first entry is then the last face solution,
    clamped to the bounds: hand them to :func:`solve_cpu`). For small ``m`` (measured: 2-3.5x
    faster than :func:`try_pivoting` at m = 8-32, whose time is per-operation dispatch there);
    the same steps as :func:`try_pivoting`, so the same result."""
    k, m = lower.shape
    size = m // 2 if size is None else min(size, m // 2)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky_ex(gramian)[0])
    pair = extended_pair(gramian, inverse)
    gramian_scale = gramian.abs().amax()
    active = initial_active(gramian, lower, init)
    best = torch.full((k, 1), m + 1, dtype=torch.int64, device=lower.device)
    tries = torch.full((k, 1), BLOCK_TRIES, dtype=torch.int64, device=lower.device)
    todo = torch.ones(k, 1, dtype=torch.int32, device=lower.device)
    done = torch.zeros((), dtype=torch.bool, device=lower.device)

    def body(
        v: Tensor,
        act: Tensor,
        best: Tensor,
        tries: Tensor,
        todo: Tensor,
        left: Tensor,
        done: Tensor,
    ) -> tuple[Tensor, ...]:
        # The masks are carried as int32: Inductor's CPU code writes boolean tensors slowly
        # (see docs/faq.rst), and a loop carry is written at every step.
        # The padding is read from a tensor's length, not from a closed-over int: compiled with
        # a dynamic ``size`` (a second size seen), a closed-over symbolic int is unbound in
        # Inductor's loop body ("NameError: name 's49' is not defined").
        size = padding.shape[0]
        active, undone = act != 0, todo != 0
        n_active = active.sum(-1, keepdim=True)
        fits = torch.minimum(n_active, m - n_active) <= size
        stopped = (left != 0) | (undone & ~fits)  # too large for the padding: left undone
        undone = undone & fits
        v_new, lam = _face_solve(gramian, inverse, lower, active, size, pair)
        bad = _infeasible(v_new, lam, lower, active, gramian_scale)
        v = torch.where(undone, v_new, v)
        undone = undone & bad.any(-1, keepdim=True)
        next_active, next_best, next_tries = _exchange(active, bad, best, tries)
        active = torch.where(undone, next_active, active)
        best = torch.where(undone, next_best, best)
        tries = torch.where(undone, next_tries, tries)
        return (
            v, active.to(torch.int32), best, tries, undone.to(torch.int32),
            stopped.to(torch.int32), ~undone.any(),
        )  # fmt: skip

    padding = torch.zeros(size, dtype=torch.int32, device=lower.device)
    carry = (lower.clone(), active.to(torch.int32), best, tries, todo, torch.zeros_like(todo))
    v, _, _, _, todo, left, _ = bounded_loop(n_steps, body, (*carry, done), done_index=6)
    return torch.maximum(v, lower), (todo != 0).squeeze(-1) | (left != 0).squeeze(-1)


def try_pivoting(
    gramian: Tensor,
    lower: Tensor,
    init: Tensor | None,
    max_steps: int,
    max_size: int | Callable[[int], int] | None = None,
    with_start: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pivot (CPU, eager) for at most ``max_steps`` steps, stopping before any step whose
    systems would have more than ``max_size`` unknowns (a function of the largest first
    system's size, or a number). Returns the solution (on the rows that
    are done; the bounds elsewhere), the ``[k]`` mask of the rows not done, and for those a
    feasible start no worse than the bounds (:func:`best_start`; ``None`` unless
    ``with_start``: two ``[k, m] @ [m, m]`` products saved)."""
    k, m = lower.shape
    out = lower.clone()
    undone = torch.zeros(k, dtype=torch.bool)
    if k == 0:
        return out, undone, lower[undone]
    inverse = None
    gramian_scale = gramian.abs().amax()
    rows = torch.arange(k)
    bounds = lower
    active = initial_active(gramian, lower, init)
    best = torch.full((k, 1), m + 1, dtype=torch.int64)
    tries = torch.full((k, 1), BLOCK_TRIES, dtype=torch.int64)
    v = lower
    for _ in range(max_steps):
        n_active = active.sum(-1)
        sizes = torch.minimum(n_active, m - n_active)
        size = int(sizes.amax())  # CPU: no sync
        if callable(max_size):
            max_size = max_size(size)
        if max_size is not None and size > max_size:
            break
        if inverse is None:  # factorised only once pivoting is sure to run
            inverse = torch.cholesky_inverse(torch.linalg.cholesky_ex(gramian)[0])
            pair = extended_pair(gramian, inverse)
        v, lam = _bucketed_face_solve(gramian, inverse, bounds, active, sizes, pair)
        bad = _infeasible(v, lam, bounds, active, gramian_scale)
        done = ~bad.any(-1)
        out[rows[done]] = torch.maximum(v[done], bounds[done])
        if bool(done.all()):
            return out, undone, lower[undone]
        keep = ~done
        rows, bounds, v = rows[keep], bounds[keep], v[keep]
        active, best, tries = _exchange(active[keep], bad[keep], best[keep], tries[keep])
    undone[rows] = True
    return out, undone, best_start(gramian, bounds, v) if with_start else None
