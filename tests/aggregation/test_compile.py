"""Every Gramian weighting is captured whole by ``torch.compile(fullgraph=True)``.

For each weighting: ``torch._dynamo.explain`` reports one graph and zero graph breaks, the
compiled function gives the eager result, and a second call with new values of the same shape
does not recompile. (Compile *times* are measured in ``bench/``, not asserted here.)
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import jdoptim.aggregation as agg

GRAMIAN_WEIGHTINGS = {
    "UPGradWeighting": lambda: agg.UPGradWeighting(),
    "DualProjWeighting": lambda: agg.DualProjWeighting(),
    "MGDAWeighting": lambda: agg.MGDAWeighting(),
    "IMTLGWeighting": lambda: agg.IMTLGWeighting(),
    "AlignedMTLWeighting": lambda: agg.AlignedMTLWeighting(),
    "KrumWeighting": lambda: agg.KrumWeighting(n_byzantine=1, n_selected=2),
    "PCGradWeighting": lambda: agg.PCGradWeighting(),
    "STCHWeighting": lambda: agg.STCHWeighting(),
    "MeanWeighting": lambda: agg.MeanWeighting(),
    "SumWeighting": lambda: agg.SumWeighting(),
    "ConstantWeighting": lambda: agg.ConstantWeighting(torch.arange(1.0, 7.0)),
    "RandomWeighting": lambda: agg.RandomWeighting(),
    "CAGradWeighting": lambda: agg.CAGradWeighting(c=0.5),
}

RANDOM = {"PCGradWeighting", "RandomWeighting"}


def _gramian(seed: int, m: int = 6, n: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g)
    J[0] = -J[1] + 0.1 * J[0]  # make some objectives conflict
    return J @ J.T


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(GRAMIAN_WEIGHTINGS))
def test_weighting_compiles_fullgraph_and_matches_eager(name: str) -> None:
    weighting = GRAMIAN_WEIGHTINGS[name]()
    G1, G2 = _gramian(0), _gramian(1)

    explanation = torch._dynamo.explain(lambda G: weighting(G))(G1)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        for G in (G1, G2):
            torch.manual_seed(0)
            eager = weighting(G)
            torch.manual_seed(0)
            with torch._dynamo.config.patch(error_on_recompile=G is G2):
                out = compiled(G)
            if name in RANDOM:
                # Same distribution, not the same stream: check the defining properties.
                assert out.shape == eager.shape and bool(torch.isfinite(out).all())
            else:
                torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


LOOPING = [
    "UPGradWeighting",
    "DualProjWeighting",
    "MGDAWeighting",
    "IMTLGWeighting",
    "AlignedMTLWeighting",
    "CAGradWeighting",
    "PCGradWeighting",
]


@pytest.mark.parametrize("name", LOOPING)
def test_weighting_recompiles_for_a_new_number_of_objectives(name: str) -> None:
    """A new m makes Dynamo recompile with a dynamic size: the solver loops must survive it
    (e.g. the last, smaller batch of an epoch with per-sample losses)."""
    weighting = GRAMIAN_WEIGHTINGS[name]()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    for m in (6, 9, 13):
        G = _gramian(m, m=m, n=m + 3)
        torch.manual_seed(0)
        out = compiled(G)
        assert out.shape == (m,)
        if name not in RANDOM:
            torch.testing.assert_close(out, weighting(G), rtol=1e-5, atol=1e-6)
