"""Krum / KrumWeighting: selected rows, brute-force reference, validation, compile."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import Krum, KrumWeighting


def _reference_scores(J: torch.Tensor, f: int) -> list[float]:
    """Brute force from the rows: score = sum of distances to the m - f - 2 nearest others."""
    m = J.shape[0]
    scores = []
    for i in range(m):
        distances = sorted(float((J[i] - J[j]).norm()) for j in range(m) if j != i)
        scores.append(sum(distances[: m - f - 2]))
    return scores


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(3, 9),
    n=st.integers(1, 5),
    data=st.data(),
)
def test_matches_brute_force_reference(seed: int, m: int, n: int, data) -> None:
    f = data.draw(st.integers(0, m - 3))
    k = data.draw(st.integers(1, m))
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = KrumWeighting(n_byzantine=f, n_selected=k)(J @ J.T)
    selected = [i for i in range(m) if w[i] > 0]
    assert len(selected) == k
    torch.testing.assert_close(w[selected], torch.full((k,), 1.0 / k, dtype=torch.float64))
    # The selection is a set of k smallest scores (ties, e.g. mutual nearest neighbours, may be
    # broken either way).
    scores = _reference_scores(J, f)
    others = [scores[i] for i in range(m) if i not in selected]
    if others:
        assert max(scores[i] for i in selected) <= min(others) + 1e-9
    torch.testing.assert_close(Krum(n_byzantine=f, n_selected=k)(J), w @ J)


def test_picks_the_cluster_not_the_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.01 * torch.randn(6, 4, generator=g)
    byzantine = torch.tensor([[100.0, -50.0, 3.0, 0.0], [-80.0, 90.0, 0.0, 7.0]])
    J = torch.cat([honest[:3], byzantine, honest[3:]])
    w = KrumWeighting(n_byzantine=2, n_selected=4)(J @ J.T)
    assert w[3:5].tolist() == [0.0, 0.0]
    assert int((w > 0).sum()) == 4 and abs(float(w.sum()) - 1.0) < 1e-6
    assert set(w.unique().tolist()) <= {0.0, 0.25}


def test_known_value_and_repr() -> None:
    J = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0], [1.0, 2.0, 3.0], [2.0, 0.0, 1.0]]
    )
    torch.testing.assert_close(Krum(1, 4)(J), torch.tensor([1.25, 0.75, 1.5]))
    assert repr(Krum(1, 4)) == "Krum(n_byzantine=1, n_selected=4)"
    assert str(Krum(1, 4)) == "Krum1-4"
    assert repr(KrumWeighting(0)) == "KrumWeighting()"


def test_distances_are_clamped() -> None:
    # Identical rows: rounding can make q_i + q_j - 2 G_ij slightly negative; no NaN.
    J = torch.tensor([[0.1, 0.7, 0.3]] * 3 + [[1.0, 2.0, 3.0]])
    w = KrumWeighting(n_byzantine=1)(J @ J.T)
    assert bool(torch.isfinite(w).all()) and float(w.sum()) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_byzantine": -1}, "n_byzantine must be non-negative, but got -1."),
        ({"n_byzantine": 0, "n_selected": 0}, "n_selected must be a positive integer, but got 0."),
    ],
)
def test_bad_parameters(kwargs: dict, message: str) -> None:
    for cls in (Krum, KrumWeighting):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


def test_too_few_rows() -> None:
    G = torch.eye(3)
    with pytest.raises(
        ValueError,
        match=r"at least 4 rows \(n_byzantine \+ 3\)\. Found `gramian` "
        r"with 3 rows",
    ):
        KrumWeighting(n_byzantine=1)(G)
    with pytest.raises(ValueError, match=r"at least 5 rows \(n_selected\)"):
        KrumWeighting(n_byzantine=0, n_selected=5)(torch.eye(4))
    with pytest.raises(ValueError):
        Krum(0)(torch.ones(2, 2, 2))


def test_differentiable_through_the_combination() -> None:
    J = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = KrumWeighting(1, 2)(J.detach() @ J.detach().T)
    Krum(1, 2)(J).sum().backward()
    torch.testing.assert_close(J.grad, w.unsqueeze(1).expand(5, 3))


def test_compiles_fullgraph_without_recompiling() -> None:
    torch._dynamo.reset()
    weighting = KrumWeighting(n_byzantine=1, n_selected=2)
    Gs = [J @ J.T for J in (torch.randn(6, 9), torch.randn(6, 9))]
    explanation = torch._dynamo.explain(lambda G: weighting(G))(Gs[0])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda G: weighting(G), fullgraph=True)
    for G, recompile_is_error in itertools.product(Gs, [True]):
        with torch._dynamo.config.patch(error_on_recompile=G is Gs[1] and recompile_is_error):
            torch.testing.assert_close(compiled(G), weighting(G))
