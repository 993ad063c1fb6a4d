"""Tests of NashMTL (the torchjd reference numbers are in test_reference_values.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cvxpy") is None or importlib.util.find_spec("ecos") is None,
    reason="NashMTL needs cvxpy and ecos",
)

from jdoptim.aggregation import NashMTL, Stateful  # noqa: E402

torch.set_num_threads(1)

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _jacobian(seed: int, m: int = 3, n: int = 6) -> torch.Tensor:
    """Rows sharing a common direction: Nash-MTL's linearisation needs G alpha > 0 (on strongly
    conflicting rows its first convex problem is unbounded and alpha stays at its start)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, generator=g, dtype=torch.float64)
    return common + 0.7 * torch.randn(m, n, generator=g, dtype=torch.float64)


def _run(aggregator: NashMTL, matrices: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    captured: list[torch.Tensor] = []
    handle = aggregator.weighting.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        outputs = [aggregator(J) for J in matrices]
    finally:
        handle.remove()
    return list(zip(outputs, captured, strict=True))


@pytest.mark.parametrize("m", [2, 3, 5])
def test_weights_solve_the_nash_bargaining_condition(m: int) -> None:
    J = _jacobian(m, m, 2 * m)
    ((out, alpha),) = _run(NashMTL(n_tasks=m, max_norm=0.0, optim_niter=50), [J])
    G = J @ J.T
    # alpha_i (G alpha)_i = 1 for every task, alpha > 0.
    assert bool((alpha > 0).all())
    torch.testing.assert_close(alpha * (G @ alpha), torch.ones(m, dtype=J.dtype), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, alpha @ J)


def test_max_norm_rescales_the_update() -> None:
    J = 10 * _jacobian(1)
    ((free, _),) = _run(NashMTL(n_tasks=3, max_norm=0.0), [J])
    ((capped, alpha),) = _run(NashMTL(n_tasks=3, max_norm=0.5), [J])
    assert float(free.norm()) > 0.5
    torch.testing.assert_close(capped.norm(), torch.tensor(0.5, dtype=J.dtype))
    torch.testing.assert_close(capped, free * 0.5 / free.norm())
    torch.testing.assert_close(capped, alpha @ J)


def test_update_weights_every_reuses_alpha() -> None:
    matrices = [_jacobian(i) for i in range(5)]
    steps = _run(NashMTL(n_tasks=3, max_norm=0.0, update_weights_every=2), matrices)
    alphas = [alpha for _, alpha in steps]
    torch.testing.assert_close(alphas[1], alphas[0])
    torch.testing.assert_close(alphas[3], alphas[2])
    assert not torch.allclose(alphas[2], alphas[0])


@pytest.mark.parametrize("update_weights_every", [1, 2])
def test_state_dict_round_trip_continues_the_sequence(update_weights_every: int) -> None:
    matrices = [_jacobian(i) for i in range(4)]
    original = NashMTL(n_tasks=3, update_weights_every=update_weights_every)
    first = _run(original, matrices[:1])
    state = original.state_dict()
    assert {"weighting.step", "weighting.prvs_alpha"} <= set(state)
    restored = NashMTL(n_tasks=3, update_weights_every=update_weights_every)
    restored.load_state_dict(state)
    rest_original = _run(original, matrices[1:])
    rest_restored = _run(restored, matrices[1:])
    for (o1, a1), (o2, a2) in zip(rest_original, rest_restored, strict=True):
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
        torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    # The state matters: a fresh instance does not follow the same sequence.
    fresh = _run(NashMTL(n_tasks=3, update_weights_every=update_weights_every), matrices[1:])
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(fresh, rest_original, strict=True))
    assert first  # the first call ran


def test_reset_restores_the_initial_state() -> None:
    aggregator = NashMTL(n_tasks=3, update_weights_every=3)
    assert isinstance(aggregator, Stateful)
    matrices = [_jacobian(i) for i in range(3)]
    first = _run(aggregator, matrices)
    aggregator.reset()
    assert int(aggregator.weighting.step) == 0
    again = _run(aggregator, matrices)
    for (o1, a1), (o2, a2) in zip(first, again, strict=True):
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
        torch.testing.assert_close(a1, a2, rtol=0, atol=0)


def test_not_differentiable_and_keeps_dtype() -> None:
    J = J_BASE.float().requires_grad_()
    out = NashMTL(n_tasks=2)(J)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, torch.tensor([0.054153, 0.706069, 0.706069]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tasks": 0}, "n_tasks must be a positive integer"),
        ({"n_tasks": 2, "max_norm": -1.0}, "max_norm must be non-negative"),
        ({"n_tasks": 2, "update_weights_every": 0}, "update_weights_every must be a positive"),
        ({"n_tasks": 2, "optim_niter": 0}, "optim_niter must be a positive integer"),
    ],
)
def test_invalid_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NashMTL(**kwargs)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="n_tasks = 2 rows"):
        NashMTL(n_tasks=2)(torch.ones(3, 4))
    with pytest.raises(ValueError, match="non-zero Frobenius norm"):
        NashMTL(n_tasks=2)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="overflow"):
        NashMTL(n_tasks=2)(torch.tensor([[1e11, 3.0], [1.0, -1e11]]))  # ||G||_F > float32 max
    with pytest.raises(ValueError):
        NashMTL(n_tasks=2)(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]))


def test_repr_and_str() -> None:
    aggregator = NashMTL(n_tasks=2)
    assert repr(aggregator) == (
        "NashMTL(n_tasks=2, max_norm=1.0, update_weights_every=1, optim_niter=20)"
    )
    assert str(aggregator) == "NashMTL"


def test_missing_dependencies_raise_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ecos" else real(name)
    )
    with pytest.raises(ImportError, match=r'pip install "jdoptim\[nash_mtl\]"'):
        NashMTL(n_tasks=2)
