"""The exact dual-cone solver (``solver="torch"``): quadprog, KKT, equivariance, every path.

About 1,200 generated cases across the families of :func:`tests.solvers.bank.make_family`
(Pareto-stationary strong/weak, duplicated rows, opposite rows, rank-deficient, random; rows in
a random order; scales 2^-27..2^27, about 1e-8..1e8), plus a few large problems.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.solvers import active_set, dual_cone, set_eager_compilation
from jdoptim.solvers._loop import fixed_loop
from jdoptim.solvers.dual_cone import condition_bound, project_weights
from jdoptim.solvers.normalization import normalize, normalized_ridge, regularize

from .bank import FAMILIES, make_family, make_jacobian

F64 = torch.float64
REG = 1e-4


def _g_hat(G: torch.Tensor) -> torch.Tensor:
    return regularize(normalize(G.to(F64)), REG)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref).abs().max() / ref.abs().max().clamp(min=1e-300))


def _assert_kkt(V: torch.Tensor, U: torch.Tensor, G: torch.Tensor, tol: float) -> None:
    """``v >= u``, ``lambda = G_hat v >= 0`` and ``lambda * (v - u) = 0``, relative to the
    scale of each row; and the update never conflicts beyond the ridge:
    ``(G_n w)_i >= -reg_eps * w_i`` for every row's solution."""
    V, U = V.to(F64), U.to(F64)
    G_hat = _g_hat(G)
    lam = V @ G_hat
    scale = torch.maximum(V.abs(), U.abs()).amax(-1, keepdim=True).clamp(min=1e-300)
    assert bool((V - U >= -tol * scale).all())
    assert bool((lam >= -tol * scale).all()), float((lam / scale).amin())
    assert bool(((lam * (V - U)).abs() <= tol * scale**2).all())
    G_n = normalize(G.to(F64))
    assert bool((V @ G_n >= -REG * V.clamp(min=0) - tol * scale).all())


@contextlib.contextmanager
def _native(on: bool):
    """Route the CPU operator's small-m rows to the compiled active-set method (``on``) or to
    the torch solver (hypothesis tests draw both, so that both stay covered)."""
    before = dual_cone.NATIVE_ACTIVE_MAX_M
    dual_cone.NATIVE_ACTIVE_MAX_M = before if on else 0
    try:
        yield
    finally:
        dual_cone.NATIVE_ACTIVE_MAX_M = before


def _check(J: torch.Tensor, dtype: torch.dtype = F64, tol: float = 1e-6, rows: str = "upgrad"):
    G = (J @ J.T).to(dtype)
    m = G.shape[0]
    if rows == "upgrad":
        U = torch.eye(m, dtype=dtype) / m
    else:  # DualProj-like and signed bounds
        g = torch.Generator().manual_seed(m)
        U = torch.cat([torch.full((1, m), 1.0 / m), torch.randn(2, m, generator=g)]).to(dtype)
    W = project_weights(U, G)
    assert W.dtype == dtype
    W_ref = project_weights(U.to(F64), G.to(F64), solver="quadprog")
    assert _rel_err(W, W_ref) <= tol
    assert _rel_err(W.sum(0), W_ref.sum(0)) <= tol
    _assert_kkt(W, U, G, 1e-7 if dtype == F64 else 1e-4)


@settings(max_examples=700, deadline=None, database=None)
@given(
    family=st.sampled_from(FAMILIES),
    m=st.integers(1, 10),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    log2_scale=st.integers(-27, 27),
    native=st.booleans(),
)
def test_families_match_quadprog(
    family: str, m: int, n: int, seed: int, log2_scale: int, native: bool
) -> None:
    J = make_family(family, m, n, seed) * 2.0 ** (log2_scale / 2)
    with _native(native):
        _check(J)


@settings(max_examples=200, deadline=None, database=None)
@given(
    family=st.sampled_from(FAMILIES),
    m=st.integers(2, 10),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    native=st.booleans(),
)
def test_signed_and_dualproj_bounds_match_quadprog(
    family: str, m: int, n: int, seed: int, native: bool
) -> None:
    with _native(native):
        _check(make_family(family, m, n, seed), rows="signed")


@settings(max_examples=150, deadline=None, database=None)
@given(
    family=st.sampled_from(FAMILIES),
    m=st.integers(2, 10),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    log2_scale=st.integers(-27, 27),
    native=st.booleans(),
)
def test_float32_matches_quadprog(
    family: str, m: int, n: int, seed: int, log2_scale: int, native: bool
) -> None:
    J = make_family(family, m, n, seed) * 2.0 ** (log2_scale / 2)
    with _native(native):
        _check(J, dtype=torch.float32, tol=1e-4)


@settings(max_examples=150, deadline=None, database=None)
@given(
    family=st.sampled_from(FAMILIES),
    m=st.integers(2, 12),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    native=st.booleans(),
)
def test_permutation_equivariance(family: str, m: int, n: int, seed: int, native: bool) -> None:
    """``W(P G P^T) = P W(G) P^T`` (UPGrad's rows follow the objectives), to 1e-9."""
    G = (lambda J: J @ J.T)(make_family(family, m, n, seed, permute=False))
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    U = torch.eye(m, dtype=F64) / m
    with _native(native):
        W = project_weights(U, G)
        W_perm = project_weights(U, G[perm][:, perm])
    scale = float(W.abs().max())
    torch.testing.assert_close(W_perm, W[perm][:, perm], rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("family", ["strong", "weak"])
@pytest.mark.parametrize("m, n", [(10, 5), (64, 32), (128, 64)])
def test_pareto_stationary_large(family: str, m: int, n: int) -> None:
    _check(make_family(family, m, n, seed=m + n))


def test_pareto_stationary_m256() -> None:
    # quadprog alone takes several seconds here (256 QPs of size 256).
    _check(make_family("weak", 256, 128, seed=0))


def test_zero_gramian_gives_the_positive_part() -> None:
    U = torch.tensor([[0.5, -1.0, 2.0], [-0.1, 0.0, 0.3]], dtype=F64)
    torch.testing.assert_close(project_weights(U, torch.zeros(3, 3, dtype=F64)), U.clamp(min=0))


def test_output_dtype_device_and_shape() -> None:
    J = torch.randn(4, 6)
    out = project_weights(torch.eye(4).reshape(2, 2, 4), J @ J.T)
    assert out.shape == (2, 2, 4) and out.dtype == torch.float32


def _cycling_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A weakly Pareto-stationary Gramian on which plain primal-dual active-set steps cycle."""
    J = make_family("weak", 10, 5, seed=0, permute=False)
    return _g_hat(J @ J.T), torch.eye(10, dtype=F64) / 10


def test_pivoting_safeguard_prevents_cycling(monkeypatch: pytest.MonkeyPatch) -> None:
    G_hat, U = _cycling_problem()
    steps: list[int] = []
    original = active_set._exchange

    def spy(*args):
        steps.append(1)
        return original(*args)

    monkeypatch.setattr(active_set, "_exchange", spy)
    kappa = condition_bound(REG)
    exact = active_set.solve_cpu(G_hat, U, REG, kappa)
    torch.testing.assert_close(exact, dual_cone._quadprog_solve(G_hat, U), rtol=0, atol=1e-10)
    assert len(steps) < 40
    # Without the safeguard (full exchanges only) some row cycles until the pivot limit; the
    # polish still returns the solution.
    steps.clear()
    monkeypatch.setattr(active_set, "BLOCK_TRIES", 10**9)
    polished = active_set.solve_cpu(G_hat, U, REG, kappa)
    assert len(steps) == active_set.pivot_limit(10)
    torch.testing.assert_close(polished, exact, rtol=0, atol=1e-9)


def test_certificate_rejects_inexact_and_accepts_exact() -> None:
    J = make_family("strong", 16, 8, seed=3)
    G = J @ J.T
    U = torch.eye(16, dtype=F64) / 16
    exact = project_weights(U, G, solver="quadprog")
    rough = project_weights(U, G, solver="mprgp", n_iters=3)
    G_hat = _g_hat(G)
    assert bool(active_set.certify(G_hat, U, exact, REG, 1e-9).all())
    assert not bool(active_set.certify(G_hat, U, rough, REG, 1e-9).all())


def test_uncertified_rows_are_solved_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first phase that stops far from the solution is caught by the certificate."""
    from jdoptim.solvers import mprgp

    monkeypatch.setattr(
        dual_cone, "mprgp_shrinking", lambda g, u, *a, **k: mprgp.mprgp_solve(g, u, 2)
    )
    J = make_family("weak", 24, 12, seed=5)
    G = J @ J.T
    U = torch.eye(24, dtype=F64) / 24
    ref = project_weights(U, G, solver="quadprog")
    assert _rel_err(project_weights(U, G, solver="mprgp", n_iters=2), ref) > 1e-4
    assert _rel_err(project_weights(U, G), ref) <= 1e-9


@pytest.mark.parametrize("family", ["strong", "weak", "opposite", "rank_deficient"])
def test_fixed_budget_path_matches_quadprog(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator path on the CPU, every iteration of its budget run (no early exit)."""
    monkeypatch.setattr(
        active_set, "bounded_loop", lambda n, body, init, done_index: fixed_loop(n, body, init)
    )
    set_eager_compilation(False)
    try:
        J = make_family(family, 12, 6, seed=1)
        G_hat, U = _g_hat(J @ J.T), torch.eye(12, dtype=F64) / 12
        out = active_set.solve_fixed(G_hat, U, REG, condition_bound(REG))
        assert _rel_err(out, dual_cone._quadprog_solve(G_hat, U)) <= 1e-9
        # The polish alone, from the worst start it allows (u), meets its proven bound.
        n_iters = active_set.polish_iterations(condition_bound(REG))
        polished = active_set.apg_polish(G_hat, U, U, REG, n_iters)
        err = (polished - dual_cone._quadprog_solve(G_hat, U)).norm(dim=-1)
        assert bool((err <= active_set.POLISH_RTOL * U.norm(dim=-1)).all())
    finally:
        set_eager_compilation(True)


def test_polish_iterations_bound() -> None:
    kappa = condition_bound(REG)
    n = active_set.polish_iterations(kappa)
    q = 1 - kappa**-0.5
    assert 2 * kappa * q**n <= active_set.POLISH_RTOL**2 < 2 * kappa * q ** (n - 1)


def test_meta_device_takes_the_sync_free_path() -> None:
    """On a device other than the CPU nothing may be read back: on ``meta`` any host read
    raises. The weights keep the input's shape and device."""
    set_eager_compilation(False)
    try:
        G = torch.empty(6, 6, device="meta")
        out = project_weights(torch.eye(6, device="meta") / 6, G, reg_eps=0.25)  # short polish
        assert out.device.type == "meta" and out.shape == (6, 6) and out.dtype == torch.float32
    finally:
        set_eager_compilation(True)


def test_meta_device_captures_in_one_graph() -> None:
    torch._dynamo.reset()

    def fn(G: torch.Tensor) -> torch.Tensor:
        U = torch.eye(5, dtype=G.dtype, device=G.device) / 5
        return project_weights(U, G, reg_eps=0.25).sum(0)

    explanation = torch._dynamo.explain(fn)(torch.empty(5, 5, dtype=F64, device="meta"))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()


def test_compiles_fullgraph_on_cpu_matches_eager_no_recompile() -> None:
    torch._dynamo.reset()

    def fn(G: torch.Tensor) -> torch.Tensor:
        return project_weights(torch.eye(G.shape[0], dtype=G.dtype) / G.shape[0], G).sum(0)

    G1, G2 = ((lambda J: J @ J.T)(make_family(f, 12, 6, seed=2)) for f in ("strong", "weak"))
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(G1), fn(G1), rtol=1e-9, atol=1e-12)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(G2), fn(G2), rtol=1e-9, atol=1e-12)
    torch._dynamo.reset()


def test_regression_fixed_budget_mprgp_was_silently_inexact() -> None:
    """Issue 10: a strongly Pareto-stationary 20 x 10 Jacobian (rows permuted) on which the
    former default's fixed budget stops 1e-4 away from the solution; the exact solver is not."""
    J = make_family("strong", 20, 10, seed=114)
    G = J @ J.T
    U = torch.eye(20, dtype=F64) / 20
    ref = project_weights(U, G, solver="quadprog").sum(0)
    # The fixed budget's 1e-4 error shows on AVX-512 MKL, not under MKL_CBWR=COMPATIBLE (float
    # order decides where it stops): no assertion on it, only on the exact solver.
    assert _rel_err(project_weights(U, G).sum(0), ref) <= 1e-12


def test_bucketed_face_solve_equals_one_padded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows split by system size (W2-like: most systems small, a few large) give the same
    ``v`` and ``lambda`` as one batch padded to the largest system, and the split happens."""
    m, k = 96, 64
    g = torch.Generator().manual_seed(3)
    J = torch.randn(m, 2 * m, generator=g, dtype=F64)
    G = regularize(normalize(J @ J.T, 1e-300), 1e-4)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(G))
    lower = torch.randn(k, m, generator=g, dtype=F64)
    n_free = torch.where(torch.arange(k) < 48, 2, 46)  # 48 rows with 2 free, 16 with 46
    scores = torch.rand(k, m, generator=g)
    active = scores.argsort(-1).argsort(-1) >= n_free[:, None]
    sizes = torch.minimum(active.sum(-1), m - active.sum(-1))
    pair = active_set.extended_pair(G, inverse)
    calls = []
    face_solve = active_set._face_solve
    monkeypatch.setattr(active_set, "_face_solve", lambda *a: calls.append(a[4]) or face_solve(*a))
    v, lam = active_set._bucketed_face_solve(G, inverse, lower, active, sizes, pair)
    assert sorted(calls) == [2, 46]
    v_ref, lam_ref = face_solve(G, inverse, lower, active, int(sizes.max()), pair)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam, lam_ref, rtol=1e-12, atol=1e-12)


def test_face_systems_of_aliased_sizes_get_one_more_padding_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Systems of 128 unknowns (a multiple of 64) are padded to 129 on the CPU (the
    factorisation is twice as fast): the face minimiser still satisfies its equations."""
    m, k = 256, 3
    g = torch.Generator().manual_seed(4)
    J = torch.randn(m, m + 8, generator=g, dtype=F64)
    G = regularize(normalize(J @ J.T, 1e-300), 1e-4)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(G))
    lower = torch.randn(k, m, generator=g, dtype=F64)
    active = torch.rand(k, m, generator=g).argsort(-1) < 128  # |A| = |F| = 128 in every row
    shapes = []
    cholesky_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda a: shapes.append(a.shape[-1]) or cholesky_ex(a)
    )
    v, lam = active_set._face_solve(G, inverse, lower, active, 128)
    assert shapes == [129]
    torch.testing.assert_close(v[active], lower[active], rtol=0, atol=0)  # v_A = u_A
    grad = v @ G
    torch.testing.assert_close(grad[~active], torch.zeros(k * 128, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(lam[active], grad[active], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_pivoting_matches_eager_pivoting(family: str) -> None:
    """The compiled loop of small m (systems padded to m // 2, rows kept in the batch) takes
    the same steps as the eager pivoting, hence the same solution."""
    m = 12
    J = make_family(family, m, 7, seed=5)
    G_hat = regularize(normalize(J @ J.T, 1e-300), 1e-4)
    U = torch.eye(m, dtype=F64)
    padded, undone = active_set.pivot_padded(G_hat, U, None, active_set.pivot_limit(m))
    eager, undone_eager, _ = active_set.try_pivoting(G_hat, U, None, active_set.pivot_limit(m))
    assert not undone.any() and not undone_eager.any()
    torch.testing.assert_close(padded, eager, rtol=0, atol=1e-13)


def test_padded_pivoting_compiles_for_a_second_padding() -> None:
    """A second padding size makes Dynamo compile the loop with a dynamic size; that kernel
    must compile (it once failed in Inductor, silently falling back to the eager loop) and take
    the same steps as the eager pivoting."""
    set_eager_compilation(True)  # retries a solver whose compilation failed earlier
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for m in (8, 10):
            J = make_family("weak", m, 5, seed=m)
            G_hat = regularize(normalize(J @ J.T, 1e-300), 1e-4)
            U = torch.eye(m, dtype=F64)
            # The size passed as an int, as the CPU operator does (``_padded_size``).
            limit = active_set.pivot_limit(m)
            x, undone = active_set.pivot_padded(G_hat, U, None, limit, m // 2)
            eager, undone_eager, _ = active_set.try_pivoting(
                G_hat, U, None, active_set.pivot_limit(m)
            )
            assert not undone.any() and not undone_eager.any()
            torch.testing.assert_close(x, eager, rtol=0, atol=1e-13)


def test_pivoting_first_limit_depends_on_the_first_systems() -> None:
    """``try_pivoting`` fixes a callable size limit from its first systems' largest size, so
    per-sample-like Gramians (small first systems) may pivot on larger systems than others."""
    m = 40
    J = make_jacobian("aligned_conflict", m, seed=3)  # systems grow from the first step on
    G_hat = regularize(normalize(J @ J.T, 1e-300), 1e-4)
    U = torch.eye(m, dtype=F64)
    seen = []
    _, undone, _ = active_set.try_pivoting(G_hat, U, None, 50, lambda s: seen.append(s) or s)
    n_active = active_set.initial_active(G_hat, U, None).sum(-1)
    assert seen == [int(torch.minimum(n_active, m - n_active).amax())]  # evaluated once
    assert undone.any()  # capped at the first size: the grown systems are left
    x, undone, _ = active_set.try_pivoting(G_hat, U, None, 50, lambda s: m)
    assert not undone.any()
    eager, _, _ = active_set.try_pivoting(G_hat, U, None, 50)
    torch.testing.assert_close(x, eager, rtol=0, atol=0)
    assert dual_cone.pivot_first_size(256, 51) == 96 > dual_cone.pivot_first_size(256, 52) == 73


def test_rows_left_by_padded_pivoting_are_finished_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one pivoting step allowed, rows are left undone; the CPU operator finishes them
    (eager pivoting, then the proven polish) and still matches quadprog."""
    monkeypatch.setattr(dual_cone, "NATIVE_ACTIVE_MAX_M", 0)  # the torch solver's path
    J = make_family("strong", 10, 6, seed=2)
    U = torch.eye(10, dtype=F64)
    monkeypatch.setattr(dual_cone, "PADDED_PIVOT_AFTER_CALLS", 0)
    monkeypatch.setattr(dual_cone, "pivot_limit", lambda m: 1)
    calls = []
    solve_cpu = dual_cone.solve_cpu
    monkeypatch.setattr(dual_cone, "solve_cpu", lambda *a: calls.append(1) or solve_cpu(*a))
    W = project_weights(U, J @ J.T)
    assert calls, "one step should leave rows undone"
    assert _rel_err(W, project_weights(U, J @ J.T, solver="quadprog")) < 1e-9


def test_narrow_padding_leaves_outgrown_rows_to_the_eager_solver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Systems padded below m // 2: rows whose system outgrows the padding stop, undone (the
    others are exact), and the CPU operator finishes them; per-sample-like Gramians (small
    first systems) at 32 < m <= 64 take the narrow padding, and match quadprog."""
    monkeypatch.setattr(dual_cone, "NATIVE_ACTIVE_MAX_M", 0)  # the torch solver's path
    m = 40
    J = make_jacobian("aligned_conflict", m, seed=3)  # final systems of 10 to 20 unknowns
    G_hat = regularize(normalize(J @ J.T, 1e-300), 1e-4)
    U = torch.eye(m, dtype=F64)
    x, undone = active_set.pivot_padded(G_hat, U, None, active_set.pivot_limit(m), 16)
    eager, _, _ = active_set.try_pivoting(G_hat, U, None, active_set.pivot_limit(m))
    assert undone.any() and not undone.all()
    torch.testing.assert_close(x[~undone], eager[~undone], rtol=0, atol=1e-13)
    monkeypatch.setattr(dual_cone, "PADDED_PIVOT_AFTER_CALLS", 0)
    monkeypatch.setattr(dual_cone, "NARROW_PIVOT_SIZE", 16)
    monkeypatch.setattr(dual_cone, "NARROW_PIVOT_START", m)
    sizes = []
    padded = dual_cone.pivot_padded
    monkeypatch.setattr(dual_cone, "pivot_padded", lambda *a: sizes.append(a[4]) or padded(*a))
    W = project_weights(U, J @ J.T)
    assert sizes == [16]
    assert _rel_err(W, project_weights(U, J @ J.T, solver="quadprog")) < 1e-9


def test_compiled_pivoting_takes_over_after_the_warm_up_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small m: the eager pivoting for the first PADDED_PIVOT_AFTER_CALLS calls of a process
    (nothing to compile for short runs), the compiled loop after them; same weights."""
    monkeypatch.setattr(dual_cone, "NATIVE_ACTIVE_MAX_M", 0)  # the torch solver's path
    J = make_family("weak", 9, 5, seed=4)
    U = torch.eye(9, dtype=F64)
    monkeypatch.setattr(dual_cone, "PADDED_PIVOT_AFTER_CALLS", 2)
    monkeypatch.setattr(dual_cone, "_small_calls", [0])
    calls = []
    padded = dual_cone.pivot_padded
    monkeypatch.setattr(dual_cone, "pivot_padded", lambda *a: calls.append(1) or padded(*a))
    W = [project_weights(U, J @ J.T) for _ in range(3)]
    assert len(calls) == 1  # the third call only
    torch.testing.assert_close(W[2], W[0], rtol=0, atol=1e-13)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 12),
    exponent=st.sampled_from([-1100, -1030, -600, -60, 0, 60, 600]),
    eps=st.sampled_from([None, 1e-4, 0.0]),
    zero=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_normalized_ridge_is_normalize_then_regularize_bit_for_bit(
    m: int, exponent: int, eps: float | None, zero: bool, seed: int
) -> None:
    """The CPU path of ``normalized_ridge`` (the trace read once) gives the bits of the sync-free
    ``regularize(normalize(G, eps), reg_eps)`` on every trace: normal, subnormal, below the
    threshold, zero; and the sync-free path runs where no data can be read (``meta``)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, m + 1, generator=g, dtype=F64) * (0.0 if zero else 2.0 ** (exponent // 2))
    G = J @ J.T
    expected = regularize(normalize(G, eps), REG)
    got = normalized_ridge(G, eps, REG)
    # (NaN in both for eps = 0 and a zero trace: 0 / 0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert got.data_ptr() != G.data_ptr()
    meta = normalized_ridge(G.to("meta"), eps, REG)
    assert meta.shape == G.shape and meta.dtype == G.dtype


@pytest.mark.parametrize("m", [1, 5, 130])
def test_diagonal_bounds_products_are_the_matrix_products(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UPGrad's bounds ``diag(p)`` take the O(m^2) product: the bits of ``lower @ G`` (zero,
    negative and tiny ``p_i`` included); other bounds the matrix product."""
    monkeypatch.setattr(dual_cone, "DIAGONAL_PRODUCT_MIN_M", 1)
    g = torch.Generator().manual_seed(m)
    G = _g_hat(make_jacobian("conflict", m, seed=m) @ make_jacobian("conflict", m, seed=m).T)
    p = torch.randn(m, generator=g, dtype=F64) * 2.0 ** torch.randint(-60, 60, (m,), generator=g)
    p[0] = 0.0
    U = torch.diag(p)
    assert torch.equal(dual_cone._bound_products(U, G), U @ G)
    U[-1, 0] += 1.0  # not diagonal (for m = 1: another diagonal)
    assert torch.equal(dual_cone._bound_products(U, G), U @ G)
    assert torch.equal(dual_cone._bound_products(U[:1], G), U[:1] @ G)
