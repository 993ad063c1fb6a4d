"""The compiled active-set method (jdoptim.solvers.native) and how the CPU operator checks it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.solvers import active_set, dual_cone, native
from jdoptim.solvers.active_set import initial_active
from jdoptim.solvers.dual_cone import project_weights
from jdoptim.solvers.normalization import normalize, regularize

from .bank import FAMILIES, KINDS, make_family, make_jacobian

F64 = torch.float64
needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler")


def _g_hat(J: torch.Tensor) -> torch.Tensor:
    return regularize(normalize(J @ J.T), 1e-4)


def _assert_kkt(G: torch.Tensor, U: torch.Tensor, x: torch.Tensor, rtol: float) -> None:
    """``x >= u`` exactly, ``lambda = G x >= 0`` and complementarity, to ``rtol ||u||``."""
    assert bool((x >= U).all())
    lam = x @ G
    scale = U.norm(dim=-1, keepdim=True)
    assert bool((lam >= -rtol * scale).all())
    assert bool(((lam * (x - U)).abs() <= rtol * scale**2).all())


def test_builds_wherever_a_compiler_is() -> None:
    """A machine with a C compiler (every CI machine: Inductor needs one too) gets the native
    path; the test cannot pass by silently running the torch solver everywhere."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    assert native.available()


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 7, 33, 64])
def test_rows_satisfy_kkt_and_match_quadprog(kind: str, m: int) -> None:
    """Every row finished, KKT to rounding (``v >= u`` exactly, ``lambda >= 0``,
    complementarity), and equal to quadprog; from either side, with and without a warm
    start."""
    G = _g_hat(make_jacobian(kind, m, seed=m))
    g = torch.Generator().manual_seed(m)
    U = torch.cat([torch.eye(m, dtype=F64), torch.randn(3, m, generator=g, dtype=F64)])
    ref = dual_cone._quadprog_solve(G, U)
    every = torch.ones_like(U, dtype=torch.bool)
    # Faces solved from the free side (no start, or every bound active at the start) or from
    # the active side (every bound free at the start), and a guessed start.
    for start in (None, ~every, every, ~initial_active(G, U, ref + 0.1)):
        x, done = native.solve(G, U, start=start)
        assert bool(done.all())
        _assert_kkt(G, U, x, 1e-12)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-8 * float(ref.abs().max()))


@needs_native
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    m=st.integers(2, 160),
    free_share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_any_start_reaches_the_solution(kind: str, m: int, free_share: float, seed: int) -> None:
    """From arbitrary starts (random free sets, of any size: either side, and many bounds
    leaving or entering the factors by updates), every finished row is the solution: KKT to
    rounding and quadprog's answer, up to m = NATIVE_MAX_M."""
    G = _g_hat(make_jacobian(kind, m, seed=seed))
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(m, generator=g)[:3]
    U = torch.cat([torch.eye(m, dtype=F64)[rows], torch.randn(2, m, generator=g, dtype=F64)])
    start = torch.rand(U.shape, generator=g) < free_share
    x, done = native.solve(G, U, start=start)
    assert bool(done.all())
    _assert_kkt(G, U, x, 1e-11)
    ref = dual_cone._quadprog_solve(G, U)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-7 * float(ref.abs().max()))


@needs_native
@pytest.mark.parametrize("family", FAMILIES)
def test_native_equals_torch_solver(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's two paths give the same weights (m = 40, hard families)."""
    J = make_family(family, 40, 20, seed=5)
    U = torch.eye(40, dtype=F64) / 40
    W = project_weights(U, J @ J.T)
    monkeypatch.setattr(dual_cone, "NATIVE_ACTIVE_MAX_M", 0)
    torch.testing.assert_close(W, project_weights(U, J @ J.T), rtol=0, atol=1e-12)


@needs_native
def test_unfinished_rows_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """With too few steps allowed, rows come back unfinished rather than wrong."""
    G = _g_hat(make_jacobian("lowrank", 32, seed=1))
    U = torch.eye(32, dtype=F64)
    monkeypatch.setattr(native, "max_steps", lambda m: 1)
    _, done = native.solve(G, U)
    assert not bool(done.all())


@needs_native
def test_operator_solves_what_the_native_method_leaves_or_gets_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows the native method reports unfinished, and rows it claims finished but that fail the
    certificate (here: corrupted), are solved by the torch solver: same weights."""
    J = make_family("strong", 24, 12, seed=3)
    U = torch.eye(24, dtype=F64)
    ref = project_weights(U, J @ J.T, solver="quadprog")
    solve = native.solve

    def corrupted(G, lower, start=None, products=None, rtol=1e-15):
        x, done = solve(G, lower, start, products, rtol)
        x[0] += 1e-3  # claimed done, wrong
        done[1] = False  # reported unfinished
        return x, done

    monkeypatch.setattr(native, "solve", corrupted)
    W = project_weights(U, J @ J.T)
    torch.testing.assert_close(W, ref, rtol=0, atol=1e-9)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``JDOPTIM_NATIVE=0``: not built; the operator runs the torch solver, same weights."""
    J = make_jacobian("conflict", 12, seed=2)
    U = torch.eye(12, dtype=F64)
    W = project_weights(U, J @ J.T)
    monkeypatch.setenv("JDOPTIM_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert not native.available()
    torch.testing.assert_close(project_weights(U, J @ J.T), W, rtol=0, atol=1e-12)


@needs_native
@pytest.mark.parametrize("scale", [2.0**-1000, 2.0**-500, 2.0**500, 2.0**1000])
def test_bounds_of_any_scale(scale: float) -> None:
    """The multipliers' threshold (relative to ||u||) does not overflow or underflow: bounds
    scaled by a power of two give the scaled solution, bit for bit."""
    G = _g_hat(make_jacobian("lowrank", 24, seed=2))
    g = torch.Generator().manual_seed(2)
    U = torch.cat([torch.eye(24, dtype=F64), torch.randn(3, 24, generator=g, dtype=F64)])
    start = ~initial_active(G, U, None)
    x, done = native.solve(G, U, start=start)
    y, done_scaled = native.solve(G, U * scale, start=start)
    assert bool(done.all()) and bool(done_scaled.all())
    assert torch.equal(y, x * scale)


@needs_native
def test_unwritable_cache_falls_back_to_a_private_temporary_directory(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache that cannot be written (a read-only home) builds into <tmp>/jdoptim-<uid>,
    created private; a temporary directory others can write to is refused."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("JDOPTIM_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    lib = native._build()
    assert lib is not None
    private = tmp_path / f"jdoptim-{native.os.getuid()}"
    assert [p.suffix for p in private.iterdir()] == [".so"]
    assert private.stat().st_mode & 0o077 == 0
    private.chmod(0o777)  # now shared: not trusted
    with pytest.raises(PermissionError):
        native._build()


def _per_sample_jacobian(m: int, seed: int) -> torch.Tensor:
    """Per-sample gradients of a small classifier's cross-entropy (the W2 kind: few active
    bounds in the Newton guess)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with torch.no_grad():  # torch's default scale (uniform in +-1/sqrt(fan_in)), zero biases
        for p in model.parameters():
            bound = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.0
            p.copy_((2 * torch.rand(p.shape, generator=g) - 1) * bound)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(m, 8, generator=g), torch.randint(0, 10, (m,), generator=g)

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.reshape(m, -1) for v in grads.values()], 1).double()


@needs_native
def test_per_sample_gramians_above_native_max_m(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between NATIVE_MAX_M and NATIVE_ACTIVE_MAX_M, per-sample Gramians (guessed active sets
    of at most m / NATIVE_ACTIVE_FRACTION bounds) take the native method from the active side:
    KKT on every row, and quadprog's weights on some."""
    m = 200
    assert dual_cone.NATIVE_MAX_M < m <= dual_cone.NATIVE_ACTIVE_MAX_M
    J = _per_sample_jacobian(m, seed=4)
    G = J @ J.T
    U = torch.eye(m, dtype=F64) / m
    guessed = initial_active(_g_hat(J), U, None).sum(-1)
    assert int(guessed.max()) <= m // dual_cone.NATIVE_ACTIVE_FRACTION  # the routing's premise
    calls = []
    solve = native.solve

    def spy(*args, **kwargs):
        calls.append(1)
        return solve(*args, **kwargs)

    monkeypatch.setattr(native, "solve", spy)
    W = project_weights(U, G)
    assert calls
    _assert_kkt(_g_hat(J), U, W, 1e-12)  # ||u|| = 1/m
    rows = [0, 77, 123, 199]
    ref = project_weights(U[rows], G, solver="quadprog")
    torch.testing.assert_close(W[rows], ref, rtol=0, atol=1e-9 * float(ref.abs().max()))


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1.0, 2.0**-900, 2.0**1000])
def test_compiled_certificate_decides_as_the_torch_one(kind: str, scale: float) -> None:
    """``native.certify`` takes the decisions of ``active_set.certify`` row by row: exact rows
    pass, rows off by 1e-6 (relative) fail, non-finite rows fail, and the rows in between
    (1e-14..1e-9) are decided alike, at any scale of the bounds (the torch certificate's norms
    over- and underflowed at 2^1000 and 2^-900 before its rows were rescaled: it passed such
    rows)."""
    m = 33
    G = _g_hat(make_jacobian(kind, m, seed=5))
    g = torch.Generator().manual_seed(5)
    U = torch.cat([torch.eye(m, dtype=F64), torch.randn(3, m, generator=g, dtype=F64)]) * scale
    U = torch.cat([U, torch.zeros(1, m, dtype=F64)])  # u = 0: the solution is 0
    x, done = native.solve(G, U)
    assert bool(done.all())
    certificates = (active_set.certify, native.certify)
    for cert in certificates:
        assert bool(cert(G, U, x, 1e-4, 1e-9).all())
    wrong = x + 1e-6 * scale * torch.rand(x.shape, generator=g, dtype=F64)
    wrong[0, 0], wrong[1, 1] = float("nan"), float("inf")
    for cert in certificates:
        assert not bool(cert(G, U, wrong, 1e-4, 1e-9).any())
    decided = torch.zeros(2, dtype=torch.long)  # rows passed and failed across the sizes below
    for size in (1e-14, 1e-12, 1e-11, 1e-10, 1e-9):
        noise = torch.randn(x.shape, generator=g, dtype=F64)
        y = torch.maximum(x + size * scale * noise * (noise > 0.5), U)
        ok = native.certify(G, U, y, 1e-4, 1e-9)
        assert torch.equal(ok, active_set.certify(G, U, y, 1e-4, 1e-9))
        decided += torch.stack([ok.sum(), (~ok).sum()])
    assert bool((decided > 0).all())  # both outcomes occur: the comparison is not vacuous
