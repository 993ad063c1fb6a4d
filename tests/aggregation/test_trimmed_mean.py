"""TrimmedMean: per-column trimmed mean, robustness, validation, gradients, compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.aggregation import Mean, TrimmedMean


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 9), n=st.integers(0, 5), data=st.data())
def test_matches_per_column_reference(seed: int, m: int, n: int, data) -> None:
    t = data.draw(st.integers(0, (m - 1) // 2))
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = TrimmedMean(trim_number=t)(J)
    for j in range(n):
        column = sorted(J[:, j].tolist())
        kept = column[t : m - t]
        assert abs(float(out[j]) - sum(kept) / len(kept)) < 1e-12
    # Invariant to the order of the rows.
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(TrimmedMean(trim_number=t)(J[perm]), out)


def test_trim_zero_is_the_mean_and_outliers_are_ignored() -> None:
    J = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(TrimmedMean(0)(J), Mean()(J))
    corrupted = J.clone()
    corrupted[0] = 1e9
    corrupted[1] = -1e9
    clean = TrimmedMean(2)(J)
    assert bool((TrimmedMean(2)(corrupted) - clean).abs().max() < 10 * J.abs().max())
    J_tm = torch.tensor([[1e11, 3], [1, -1e11], [-1e10, 1e10], [2, 2]], dtype=torch.float64)
    torch.testing.assert_close(TrimmedMean(1)(J_tm), torch.tensor([1.5, 2.5], dtype=torch.float64))


def test_differentiable() -> None:
    J = torch.tensor([[1.0, 5.0], [2.0, 4.0], [3.0, 6.0]], requires_grad=True)
    TrimmedMean(1)(J).sum().backward()
    assert J.grad.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


def test_validation_and_repr() -> None:
    with pytest.raises(ValueError, match="trim_number must be non-negative, but got -1."):
        TrimmedMean(-1)
    with pytest.raises(
        ValueError,
        match=r"at least 3 rows \(i.e. `2 \* trim_number \+ 1`\). "
        r"Found `matrix` of shape `torch.Size\(\[2, 3\]\)`.",
    ):
        TrimmedMean(1)(torch.ones(2, 3))
    with pytest.raises(ValueError):
        TrimmedMean(0)(torch.ones(3))
    assert repr(TrimmedMean(1)) == "TrimmedMean(trim_number=1)" and str(TrimmedMean(1)) == "TM1"


def test_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    aggregator = TrimmedMean(1)
    J1, J2 = torch.randn(6, 9), torch.randn(6, 9)
    explanation = torch._dynamo.explain(lambda J: aggregator(J))(J1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda J: aggregator(J), fullgraph=True)
    torch.testing.assert_close(compiled(J1), aggregator(J1))
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(J2), aggregator(J2))
