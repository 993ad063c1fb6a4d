"""Warm-started dual-cone weightings: same weights as a cold start, fewer iterations needed."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from jdoptim.aggregation import DualProjWeighting, UPGradWeighting
from jdoptim.solvers.dual_cone import project_weights


def _gramians(m: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(m)
    J = torch.randn(m, 3 * m, generator=g, dtype=torch.float64)
    J[0] = -J[1] + 0.2 * J[0]
    out = []
    for _ in range(steps):
        J = J + 0.01 * torch.randn(J.shape, generator=g, dtype=torch.float64)
        out.append(J @ J.T)
    return out


@pytest.mark.parametrize("cls", [UPGradWeighting, DualProjWeighting])
def test_warm_start_gives_the_cold_weights(cls) -> None:
    warm, cold = cls(warm_start=True), cls()
    for G in _gramians(12, 5):
        torch.testing.assert_close(warm(G), cold(G), rtol=1e-8, atol=1e-10)
    assert warm._previous.shape[-1] == 12
    warm.reset()
    assert warm._previous.numel() == 0


def test_warm_start_from_the_solution_needs_almost_no_iterations() -> None:
    G = _gramians(16, 1)[0]
    U = torch.eye(16, dtype=torch.float64) / 16
    exact = project_weights(U, G, solver="quadprog")
    assert not torch.allclose(project_weights(U, G, solver="mprgp", n_iters=2), exact, atol=1e-6)
    torch.testing.assert_close(
        project_weights(U, G, solver="mprgp", n_iters=2, init=exact), exact, atol=1e-10, rtol=0
    )
    # The exact solver seeded with the solution's active sets needs one face solve.
    torch.testing.assert_close(project_weights(U, G, init=exact), exact, atol=1e-10, rtol=0)


def test_warm_start_compiles_without_breaks_or_recompiles() -> None:
    torch._dynamo.reset()
    weighting = UPGradWeighting(warm_start=True)
    G1, G2, G3 = _gramians(6, 3)
    explanation = torch._dynamo.explain(lambda G: weighting(G))(G1)
    assert explanation.graph_break_count == 0
    weighting.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    compiled(G1)  # cold call: allocates the warm-start buffer
    compiled(G2)  # first warm call compiles the warm graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(G3)
    torch.testing.assert_close(out, UPGradWeighting()(G3), rtol=1e-8, atol=1e-10)
    torch._dynamo.reset()
