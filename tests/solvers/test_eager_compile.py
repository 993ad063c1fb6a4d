"""Eager calls of the solvers run a compiled kernel that gives the plain function's result."""

from __future__ import annotations

import pytest
import torch

from jdoptim.solvers import _eager_compile, set_eager_compilation
from jdoptim.solvers.eigh import eig_method, symmetric_eig
from jdoptim.solvers.simplex import minimize_linear_plus_norm

from .bank import make_jacobian


@pytest.fixture
def both_paths():
    """Call ``fn`` with eager compilation on, then off; return both results."""

    def run(fn):
        on = fn()
        set_eager_compilation(False)
        try:
            off = fn()
        finally:
            set_eager_compilation(True)
        return on, off

    return run


def test_cagrad_barrier_solver(both_paths) -> None:
    J = make_jacobian("conflict", 12, seed=2)
    G = J @ J.T
    G = G / G.diagonal().sum()
    linear = G.sum(1) / 12
    scale = 0.5 * G.sum().sqrt() / 12
    on, off = both_paths(lambda: minimize_linear_plus_norm(G, linear, scale))
    torch.testing.assert_close(on, off, rtol=0, atol=1e-9)


def test_jacobi_eigensolver(both_paths) -> None:
    J = make_jacobian("random", 10, seed=3)  # distinct eigenvalues: eigenvectors are unique
    with eig_method("jacobi"):
        (vals_on, vecs_on), (vals_off, vecs_off) = both_paths(lambda: symmetric_eig(J @ J.T))
    torch.testing.assert_close(vals_on, vals_off, rtol=0, atol=1e-10)
    # Up to sign.
    torch.testing.assert_close(vecs_on.abs(), vecs_off.abs(), rtol=0, atol=1e-8)


def test_switch_is_reported() -> None:
    assert _eager_compile.eager_compilation_enabled()
    set_eager_compilation(False)
    assert not _eager_compile.eager_compilation_enabled()
    set_eager_compilation(True)


def test_a_failed_compilation_falls_back_for_that_solver_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One solver whose compilation fails warns once and runs its plain function from then on;
    the other solvers keep their compiled kernels."""

    def broken(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    def working(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def fail(*args, **kwargs):
        raise RuntimeError("no compiler")

    f, g = _eager_compile.eager_compiled(broken), _eager_compile.eager_compiled(working)
    calls: list[str] = []
    monkeypatch.setitem(_eager_compile._cache, broken, fail)
    monkeypatch.setitem(_eager_compile._cache, working, lambda x: calls.append("g") or x * 2)
    with pytest.warns(RuntimeWarning, match="could not compile broken"):
        assert float(f(torch.tensor(1.0))) == 2.0
    assert float(f(torch.tensor(1.0))) == 2.0  # plain now: no second warning, no error
    assert float(g(torch.tensor(1.0))) == 2.0 and calls == ["g"]
    assert _eager_compile.eager_compilation_enabled()
    set_eager_compilation(True)  # retries the failed solvers
    assert broken not in _eager_compile._failed
