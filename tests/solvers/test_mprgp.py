"""The batched MPRGP dual-cone solver (``solver="mprgp"``) against quadprog, the KKT conditions
and torch.compile. The exact default solver is tested in test_dual_cone.py."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.solvers import _eager_compile, dual_cone, mprgp, set_eager_compilation
from jdoptim.solvers.dual_cone import project_weights
from jdoptim.solvers.mprgp import default_iterations, mprgp_solve
from jdoptim.solvers.normalization import normalize, regularize

from .bank import KINDS, make_jacobian

F64 = torch.float64


def _g_hat(G: torch.Tensor) -> torch.Tensor:
    return regularize(normalize(G.to(F64), 1e-4), 1e-4)


def _project(U: torch.Tensor, G: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs.setdefault("solver", "mprgp")
    kwargs.setdefault("norm_eps", 1e-4)
    return project_weights(U, G, **kwargs)


def _assert_kkt(V: torch.Tensor, U: torch.Tensor, G_hat: torch.Tensor, tol: float) -> None:
    """v >= u, lambda = G_hat v >= 0 and lambda * (v - u) = 0, relative to the data's scale."""
    lam = V @ G_hat
    scale_v = torch.maximum(V.abs(), U.abs()).amax(-1, keepdim=True).clamp(min=1e-300)
    scale_lam = G_hat.abs().amax() * scale_v
    assert bool((V - U >= -tol * scale_v).all())
    assert bool((lam >= -tol * scale_lam).all()), (lam / scale_lam).amin()
    assert bool(((lam * (V - U)).abs() <= tol * scale_lam * scale_v).all())


def _check_against_quadprog(J: torch.Tensor) -> None:
    G = J @ J.T
    m = G.shape[0]
    U = torch.eye(m, dtype=F64) / m
    W = _project(U, G)
    W_ref = _project(U, G, solver="quadprog")
    w, w_ref = W.sum(0), W_ref.sum(0)
    assert (w - w_ref).abs().max() <= 1e-5 * max(1.0, w_ref.abs().max().item())
    _assert_kkt(W, U, _g_hat(G), 1e-6)
    # Non-conflict: every row's inner product with the aggregate is non-negative, up to the ridge
    # (for an exact solution, J J^T w = tau (G_hat - reg_eps I) w >= -tau reg_eps w) and 1e-6.
    # Below norm_eps the Gramian is replaced by reg_eps * I (torchjd's rule): nothing to check.
    d = J.T @ w
    tau = G.diagonal().sum()
    if tau < 1e-4:
        assert torch.allclose(W, U)
        return
    slack = tau * 1e-4 * w.clamp(min=0) + 1e-6 * J.norm(dim=1) * d.norm()
    assert bool((J @ d >= -slack).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [2, 5, 16, 48])
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_matches_quadprog_on_bank(kind: str, m: int, scale: float) -> None:
    J = make_jacobian(kind, m, seed=m) * math.sqrt(scale)
    _check_against_quadprog(J)


@pytest.mark.parametrize("kind", ["lowrank", "aligned_conflict"])
def test_matches_quadprog_m128(kind: str) -> None:
    _check_against_quadprog(make_jacobian(kind, 128, seed=3))


def test_dualproj_single_row_matches_quadprog() -> None:
    for kind in KINDS:
        J = make_jacobian(kind, 32, seed=7)
        G = J @ J.T
        u = torch.full((32,), 1 / 32, dtype=F64)
        v = _project(u, G)
        v_ref = _project(u, G, solver="quadprog")
        assert (v - v_ref).abs().max() <= 1e-6 * max(1.0, v_ref.abs().max().item())
        _assert_kkt(v[None], u[None], _g_hat(G), 1e-6)


@settings(max_examples=25, deadline=None, database=None)
@given(
    m=st.integers(1, 8),
    n=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-6, 6),
    negative_prefs=st.booleans(),
)
def test_kkt_and_scale_invariance(
    m: int, n: int, seed: int, log_scale: float, negative_prefs: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=F64)
    U = torch.randn(m, m, generator=g, dtype=F64) if negative_prefs else torch.eye(m, dtype=F64)
    G = J @ J.T
    # MPRGP's default budget is a heuristic: on rank-1 Gramians (n = 1, condition number
    # 1/reg_eps) it can stop 0.36 away (m=6, n=1, seed=179, negative prefs). Converged, it
    # satisfies the KKT conditions; the default budget's accuracy is the exact solver's job.
    V = _project(U, G, n_iters=1000)
    _assert_kkt(V, U, _g_hat(G), 1e-7)
    # Below norm_eps the Gramian is replaced by reg_eps * I: scale invariance starts above it.
    if float(G.diagonal().sum()) * 10.0**log_scale >= 1e-3:
        V_scaled = _project(U, G * 10.0**log_scale, n_iters=1000)
        assert torch.allclose(V, V_scaled, rtol=1e-6, atol=1e-9)
    V_ref = _project(U, G, solver="quadprog")
    assert torch.allclose(V, V_ref, rtol=1e-6, atol=1e-9)
    assert torch.allclose(_project(U, G, solver="torch"), V_ref, rtol=1e-6, atol=1e-9)


def test_tiny_trace_gives_positive_part() -> None:
    G = torch.full((3, 3), 1e-6)  # trace below norm_eps: G_hat = reg_eps * I
    U = torch.tensor([[0.5, -1.0, 2.0], [-0.1, 0.0, 0.3]])
    assert torch.allclose(_project(U, G), U.clamp(min=0))


def test_output_dtype_device_and_shape() -> None:
    G = (torch.randn(4, 6) @ torch.randn(6, 4)).float()
    G = G @ G.T
    out = _project(torch.eye(4).reshape(2, 2, 4), G)
    assert out.shape == (2, 2, 4) and out.dtype == torch.float32


def test_fixed_point_once_converged() -> None:
    J = make_jacobian("lowrank", 16, seed=0)
    G_hat = _g_hat(J @ J.T)
    U = torch.eye(16, dtype=F64) / 16
    a = mprgp_solve(G_hat, U, default_iterations(16))
    b = mprgp_solve(G_hat, U, 2 * default_iterations(16))
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_invalid_solver_and_quadprog_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    G = torch.eye(2)
    with pytest.raises(ValueError, match="solver"):
        _project(torch.eye(2), G, solver="cvxpy")  # type: ignore[arg-type]
    import qpsolvers

    monkeypatch.setattr(qpsolvers, "solve_qp", lambda *a, **k: None)
    with pytest.raises(ValueError, match="Failed to solve the quadratic programming problem."):
        _project(torch.eye(2), G, solver="quadprog")
    assert dual_cone.SOLVERS == ("torch", "mprgp", "quadprog")


def test_compiles_fullgraph_matches_eager_no_recompile() -> None:
    torch._dynamo.reset()

    def fn(G: torch.Tensor) -> torch.Tensor:
        return _project(torch.eye(G.shape[0], dtype=G.dtype) / G.shape[0], G).sum(0)

    G1 = make_jacobian("aligned_conflict", 12, seed=0)
    G1 = G1 @ G1.T
    G2 = make_jacobian("lowrank", 12, seed=1)
    G2 = G2 @ G2.T
    explanation = torch._dynamo.explain(fn)(G1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    start = time.perf_counter()
    out1 = compiled(G1)
    assert time.perf_counter() - start < 60  # < 20 s on an idle 2-core machine
    assert torch.allclose(out1, fn(G1), rtol=1e-6, atol=1e-12)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out2 = compiled(G2)
    assert torch.allclose(out2, fn(G2), rtol=1e-6, atol=1e-12)
    torch._dynamo.reset()


def test_eager_calls_use_a_compiled_kernel_with_the_same_result() -> None:
    J = make_jacobian("aligned_conflict", 24, seed=4)
    G_hat = _g_hat(J @ J.T)
    U = torch.eye(24, dtype=F64) / 24
    compiled = mprgp_solve(G_hat, U)
    set_eager_compilation(False)
    try:
        plain = mprgp_solve(G_hat, U)
    finally:
        set_eager_compilation(True)
    # Both stop once the projected gradient is below 1e-10 of the bounds: equal to ~1e-9.
    torch.testing.assert_close(compiled, plain, rtol=0, atol=1e-8)


def test_compilation_failure_falls_back_to_eager_with_one_warning(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(_eager_compile._cache, mprgp._mprgp.plain, broken)
    monkeypatch.setattr(_eager_compile, "_failed", set())  # whatever earlier tests hit
    J = make_jacobian("random", 6, seed=0)
    G_hat = _g_hat(J @ J.T)
    U = torch.eye(6, dtype=F64) / 6
    try:
        set_eager_compilation(True)  # retries any solver whose compilation failed before
        with pytest.warns(RuntimeWarning, match="could not compile"):
            out = mprgp_solve(G_hat, U)
        assert mprgp._mprgp.plain in _eager_compile._failed  # that solver only
        assert _eager_compile.eager_compilation_enabled()
        torch.testing.assert_close(
            out, _project(U, J @ J.T, solver="quadprog"), rtol=1e-6, atol=1e-9
        )
    finally:
        set_eager_compilation(True)


def test_float32_first_phase_on_cpu_gives_the_float64_solution(monkeypatch) -> None:
    """For m >= FLOAT32_FIRST_MIN_M with the default budget on the CPU, a float32 phase
    warm-starts the float64 iterations; an explicit budget or a small m runs float64 only. The
    solution is the float64 one (same KKT tolerance)."""
    dtypes: list[torch.dtype] = []
    original = mprgp._mprgp

    def spy(gramian, lower, n_iters, init, rel_tol):
        dtypes.append(gramian.dtype)
        return original(gramian, lower, n_iters, init, rel_tol)

    monkeypatch.setattr(mprgp, "_mprgp", spy)
    for m, n_iters, expected in [
        (48, None, [torch.float32, F64]),
        (48, 200, [F64]),
        (mprgp.FLOAT32_FIRST_MIN_M - 1, None, [F64]),
    ]:
        dtypes.clear()
        J = make_jacobian("aligned_conflict", m, seed=2)
        G_hat = _g_hat(J @ J.T)
        U = torch.eye(m, dtype=F64)
        V = mprgp.mprgp_solve(G_hat, U, n_iters)
        assert dtypes == expected
        _assert_kkt(V, U, G_hat, 1e-6)
    monkeypatch.setattr(mprgp, "FLOAT32_FIRST_MIN_M", 10**9)
    float64_only = mprgp.mprgp_solve(G_hat, U)
    monkeypatch.setattr(mprgp, "FLOAT32_FIRST_MIN_M", 2)
    mixed = mprgp.mprgp_solve(G_hat, U)
    assert (mixed - float64_only).abs().max() <= 1e-6 * float64_only.abs().max()


@pytest.mark.parametrize("kind", ["random", "aligned_conflict", "lowrank"])
def test_shrinking_batch_matches_quadprog_and_drops_rows(kind: str, monkeypatch) -> None:
    """The CPU driver of the exact solver: rows leave the batch once they meet their stopping
    test (the batch shrinks), and every row still meets the certificate's accuracy."""
    from jdoptim.solvers import active_set
    from jdoptim.solvers.lanczos import top_pair_estimate

    sizes: list[int] = []
    original = mprgp._mprgp_chunk

    def spy(gramian, lower, *args):
        sizes.append(lower.shape[0])
        return original(gramian, lower, *args)

    monkeypatch.setattr(mprgp, "_mprgp_chunk", spy)
    m = 48
    J = make_jacobian(kind, m, seed=3)
    G_hat = _g_hat(J @ J.T)
    U = torch.eye(m, dtype=F64) / m
    spectrum = top_pair_estimate(G_hat)
    if kind == "aligned_conflict":  # one eigenvalue stands out: deflated expansion steps
        assert float(spectrum[0]) > mprgp.OUTLIER_RATIO * float(spectrum[1])
    V = mprgp.mprgp_shrinking(G_hat, U, None, 1e-13, spectrum)
    ref = project_weights(U, J @ J.T, norm_eps=1e-4, solver="quadprog")
    assert (V - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert bool(active_set.certify(G_hat, U, V, 1e-4, 1e-9).all())
    assert sizes[0] == m and min(sizes) < m


@pytest.mark.parametrize("kind", KINDS)
def test_lambda_max_estimate_is_accurate(kind: str) -> None:
    from jdoptim.solvers.lanczos import lambda_max_estimate

    J = make_jacobian(kind, 96, seed=4)
    G_hat = _g_hat(J @ J.T)
    true = float(torch.linalg.eigvalsh(G_hat)[-1])
    assert abs(float(lambda_max_estimate(G_hat)) / true - 1) <= 1e-3


def test_wrong_spectrum_estimates_still_give_the_exact_solution(monkeypatch) -> None:
    """The estimates only steer MPRGP's steps: absurd ones (a random "eigenvector", a tiny
    lambda_2) leave the exact solver's result exact (certificate, then pivoting)."""
    m = 40
    J = make_jacobian("aligned_conflict", m, seed=5)
    G = J @ J.T
    U = torch.eye(m, dtype=F64) / m
    q = torch.randn(m, generator=torch.Generator().manual_seed(0), dtype=F64)
    wrong = (torch.tensor(1e3, dtype=F64), torch.tensor(1e-9, dtype=F64), q / q.norm())
    calls = []
    monkeypatch.setattr(dual_cone, "top_pair_estimate", lambda g: calls.append(g) or wrong)
    _mprgp_on_every_row(monkeypatch)
    ref = project_weights(U, G, solver="quadprog")
    assert (project_weights(U, G) - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert calls  # the estimates were used


def _mprgp_on_every_row(monkeypatch) -> None:
    """Route the CPU operator's rows to MPRGP: neither the native method nor pivoting first."""
    monkeypatch.setattr(dual_cone, "NATIVE_ACTIVE_MAX_M", 0)
    monkeypatch.setattr(dual_cone, "PIVOT_FIRST_MAX_M", 0)


def _halfspace_minimisers(G_hat: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Reference: argmin 1/2 v^T G_hat v s.t. u^T v >= u^T u, one QP per row (quadprog)."""
    import numpy as np
    from qpsolvers import solve_qp

    P = G_hat.numpy()
    rows = [
        solve_qp(P, np.zeros(len(u)), -u[None], -np.array([u @ u]), solver="quadprog")
        for u in U.numpy()
    ]
    return torch.tensor(np.array(rows), dtype=F64)


@pytest.mark.parametrize("kind", KINDS)
def test_halfspace_start(kind: str) -> None:
    """``max(u, v_h)`` with ``v_h`` quadprog's half-space minimiser; ``u`` where ``u = 0``."""
    m = 24
    G_hat = _g_hat((lambda J: J @ J.T)(make_jacobian(kind, m, seed=7)))
    g = torch.Generator().manual_seed(3)
    diagonal = torch.diag(torch.rand(m, generator=g, dtype=F64) + 0.1)  # UPGrad's rows
    signed = torch.randn(3, m, generator=g, dtype=F64)  # any bounds (DualProj)
    U = torch.cat([diagonal, signed, torch.zeros(1, m, dtype=F64)])
    start = mprgp.halfspace_start(G_hat, U)
    ref = torch.maximum(U[:-1], _halfspace_minimisers(G_hat, U[:-1]))
    torch.testing.assert_close(start[:-1], ref, rtol=0, atol=1e-9 * float(ref.abs().max()))
    assert torch.equal(start[-1], U[-1])


def test_halfspace_start_of_a_non_positive_definite_gramian_is_the_bounds() -> None:
    U = torch.eye(3, dtype=F64)
    for G in (torch.zeros(3, 3, dtype=F64), torch.full((3, 3), float("nan"), dtype=F64)):
        assert torch.equal(mprgp.halfspace_start(G, U), U)


@pytest.mark.parametrize("kind", KINDS)
def test_mprgp_route_from_halfspace_start_is_exact(monkeypatch, kind: str) -> None:
    """The CPU's MPRGP route (taken beyond the native and pivoting limits) starts from
    ``halfspace_start`` and ends at quadprog's solution."""
    calls = []
    start = mprgp.halfspace_start
    monkeypatch.setattr(dual_cone, "halfspace_start", lambda G, U: calls.append(U) or start(G, U))
    _mprgp_on_every_row(monkeypatch)
    m = 48
    G = (lambda J: J @ J.T)(make_jacobian(kind, m, seed=8))
    U = torch.eye(m, dtype=F64) / m
    ref = project_weights(U, G, solver="quadprog")
    assert (project_weights(U, G) - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert len(calls) == 1 and calls[0].shape == (m, m)


def test_shrinking_single_row_compiles(monkeypatch) -> None:
    """One row (DualProj's case): the compiled chunk accepts its state (a [1, 1] slice of a
    [1, m] tensor once made it fail on strides, silently falling back to eager)."""
    import warnings

    monkeypatch.setattr(_eager_compile, "_failed", set())
    m = 40
    J = make_jacobian("aligned_conflict", m, seed=6)
    G_hat = _g_hat(J @ J.T)
    U = torch.full((1, m), 1.0 / m, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        V = mprgp.mprgp_shrinking(G_hat, U, None, 1e-13)
    assert not [w for w in caught if "could not compile" in str(w.message)]
    ref = project_weights(U, J @ J.T, norm_eps=1e-4, solver="quadprog")
    assert (V - ref).abs().max() <= 1e-9 * ref.abs().max()
