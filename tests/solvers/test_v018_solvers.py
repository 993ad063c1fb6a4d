"""FairGrad's Newton root finder and PCD's dual active-set QP against exact references."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch
from scipy.optimize import root

from jdoptim.solvers.fairgrad import fairgrad_root
from jdoptim.solvers.pcd import pcd_dual_qp
from jdoptim.solvers.simplex_projection import project_onto_simplex


def _gramian(seed: int, m: int, n: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = scale * torch.randn(m, n, generator=g, dtype=torch.float64)
    return J @ J.T


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize(("seed", "m", "scale"), [(0, 2, 1.0), (1, 5, 0.1), (2, 8, 30.0)])
def test_fairgrad_root_is_the_exact_root(alpha: float, seed: int, m: int, scale: float) -> None:
    G = _gramian(seed, m, 2 * m, scale)
    x = fairgrad_root(G, alpha)
    assert bool((x > 0).all())
    residual = G @ x - x.pow(-1 / alpha)
    assert float(residual.abs().max()) <= 1e-9 * float((G @ x).abs().max() + 1)
    # An independent exact solve (scipy's hybrid method, tight tolerance) in log coordinates.
    Gn = G.numpy()
    sol = root(lambda y: Gn @ np.exp(y) - np.exp(-y / alpha), np.log(x.numpy()) + 0.3, tol=1e-14)
    np.testing.assert_allclose(x.numpy(), np.exp(sol.x), rtol=1e-8)


@pytest.mark.parametrize(("seed", "n"), [(0, 1), (1, 3), (2, 6), (3, 9)])
def test_pcd_qp_matches_quadprog(seed: int, n: int) -> None:
    G = _gramian(seed, n, n + 3)
    g = torch.Generator().manual_seed(100 + seed)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    mu, infeasible = pcd_dual_qp(G, b, 1e-9, torch.tensor(1e-12, dtype=torch.float64), 10 * n + 10)
    assert not bool(infeasible)
    expected = quadprog.solve_qp(G.numpy(), b.numpy(), np.eye(n), np.zeros(n))[0]
    np.testing.assert_allclose(mu.numpy(), np.maximum(expected, 0), atol=1e-9, rtol=1e-8)


def test_simplex_projection_matches_the_sorting_rule() -> None:
    g = torch.Generator().manual_seed(0)
    for m in (1, 2, 5, 9):
        y = 3 * torch.randn(m, generator=g, dtype=torch.float64)
        x = project_onto_simplex(y)
        assert abs(float(x.sum()) - 1) < 1e-12 and bool((x >= 0).all())
        # KKT: x = max(y - theta, 0) with one theta, and every positive entry has y - x = theta.
        theta = (y - x)[x > 0]
        assert float(theta.max() - theta.min()) < 1e-12
        assert bool((y[x == 0] <= theta[0] + 1e-12).all())
