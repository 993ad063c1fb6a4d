"""Brute-force references shared by the engine tests."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.gramian import GramianResult, LayerwiseGramianEngine


def no_fallback(engine: LayerwiseGramianEngine) -> None:
    """Make the engine's whole-model fallback raise: a rule must claim every parameter."""

    def refuse(*args, **kwargs):
        shapes = [tuple(p.shape) for p in args[1]]
        raise AssertionError(f"the whole-model fallback ran for {shapes}")

    engine._fallback = refuse  # type: ignore[method-assign]


def _flat(grads: tuple[Tensor | None, ...] | list[Tensor | None], params: list[Tensor]) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def brute_force(losses: Tensor, params: list[Tensor]) -> Tensor:
    """Jacobian ``[M, n]`` of ``losses.flatten()``, one autograd call per loss."""
    rows = []
    for loss in losses.flatten():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(_flat(grads, params))
    return torch.stack(rows)


def assert_matches_jacobian(result: GramianResult, losses: Tensor, params: list[Tensor]) -> None:
    """An engine's Gramian and weighted gradient == the brute-force Jacobian's, to 1e-10
    relative (float64 inputs)."""
    J = brute_force(losses, params)
    G = J @ J.T
    assert result.gramian.shape == G.shape
    scale = G.abs().max()
    assert scale > 0
    torch.testing.assert_close(result.gramian, G, rtol=0, atol=1e-10 * scale)
    w = torch.randn(losses.numel(), dtype=torch.float64)
    flat = _flat(result.weighted_gradient(w), params)
    torch.testing.assert_close(flat, w @ J, rtol=0, atol=1e-10 * (w @ J).abs().max())
