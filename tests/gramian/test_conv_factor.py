"""Convolutions keep their inputs, not their patches (``ConvFactor``): exact against the
brute-force Jacobian for every geometry, with the per-sample gradients formed in chunks of
samples that need not divide the batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jdoptim.gramian import _layers, layerwise
from jdoptim.gramian._layers import ConvFactor
from jdoptim.gramian.layerwise import LayerwiseGramianEngine

from ._exact import assert_matches_jacobian, no_fallback


class TwoLosses(nn.Module):
    """Two losses per sample (``K = 2``)."""

    def forward(self, out: Tensor) -> Tensor:
        flat = out.flatten(1)
        return torch.stack([(flat**2).sum(1), torch.sin(flat).sum(1)], dim=1)


class Twice(nn.Module):
    """One convolution called on two inputs of different sizes (its calls side by side)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x).flatten(1), self.conv(x[:, :, ::2, 1:]).flatten(1)], 1)


def mse(out: Tensor) -> Tensor:
    return (out**2).flatten(1).sum(1)


B = 5
MODELS = {
    "stride_groups_reflect": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, groups=2, dilation=2, padding=2, padding_mode="circular"),
        ),
        (B, 2, 9, 8),
        mse,
    ),
    "zeros_same_replicate_two_losses": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, (2, 3), padding="same"),
            nn.Tanh(),
            nn.Conv2d(4, 2, 3, stride=(2, 1), padding=1, padding_mode="replicate", bias=False),
        ),
        (B, 3, 7, 6),
        TwoLosses(),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3, dilation=2, padding=2, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv1d(4, 4, 2, groups=2, stride=2, padding=1, padding_mode="circular"),
        ),
        (B, 3, 11),
        TwoLosses(),
    ),
    "called_twice": (Twice, (B, 2, 6, 7), mse),
}


ROUTES = [("auto", None), ("ghost", None), ("materialize", None), ("materialize", 2),
          ("materialize", 3)]  # fmt: skip


@pytest.mark.parametrize(("strategy", "chunk"), ROUTES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact(name: str, strategy: str, chunk: int | None, monkeypatch) -> None:
    """``chunk``: samples per chunk of the stored per-sample gradients (2 and 3 do not divide
    ``B = 5``: the last chunk is partial); ``None``: the default byte budget (one chunk) and
    routes."""
    if chunk is not None:  # per-sample gradients stored, not formed per block and dropped
        monkeypatch.setattr(layerwise, "FORMED_MAX_POSITIONS", 0)
        monkeypatch.setattr(ConvFactor, "chunk", lambda self: chunk)
    torch.manual_seed(0)
    make, shape, loss_fn = MODELS[name]
    model = make().double()
    engine = LayerwiseGramianEngine(model, strategy=strategy)
    no_fallback(engine)
    params = list(model.parameters())
    losses = loss_fn(model(torch.randn(shape, dtype=torch.float64)))
    assert_matches_jacobian(engine.compute(losses, params, retain_graph=True), losses, params)
    assert set(engine.report().values()) == {"conv"}


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 5),
    chunk=st.integers(1, 4),
    groups=st.integers(1, 2),
    c_in=st.integers(1, 2),
    c_out=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    conv1d=st.booleans(),
    K=st.integers(1, 2),
    bias=st.booleans(),
)
def test_random_geometry_and_chunks(
    B, chunk, groups, c_in, c_out, kernel, stride, dilation, padding, mode, conv1d, K, bias
) -> None:
    """One convolution of any geometry, its per-sample gradients stored and formed ``chunk``
    samples at a time: exact against the brute-force Jacobian."""
    torch.manual_seed(B + 10 * chunk + 100 * kernel)
    cls, size = (
        (nn.Conv1d, (B, c_in * groups, 7)) if conv1d else (nn.Conv2d, (B, c_in * groups, 6, 7))
    )
    model = nn.Sequential(
        cls(c_in * groups, c_out * groups, kernel, stride, padding, dilation, groups, bias, mode),
        nn.Tanh(),
    ).double()
    engine = LayerwiseGramianEngine(model, strategy="materialize")
    no_fallback(engine)
    params = list(model.parameters())
    out = model(torch.randn(size, dtype=torch.float64)).flatten(1)
    losses = torch.stack([(out**2).sum(1), torch.sin(out).sum(1)], 1)[:, :K]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layerwise, "FORMED_MAX_POSITIONS", 0)
        patch.setattr(ConvFactor, "chunk", lambda self: chunk)
        result = engine.compute(losses, params, retain_graph=True)
    assert_matches_jacobian(result, losses, params)


def test_chunk_follows_the_byte_budget(monkeypatch) -> None:
    """Samples per chunk: as many as :data:`CONV_CHUNK_BYTES` of patches hold, at least one,
    and at least ``B / CONV_MAX_CHUNKS``."""
    x = torch.zeros(7, 4, 6, 6)
    call = _layers.ConvCall(x, (0, 0, 0, 0), "constant", (3, 3), (1, 1), (1, 1), 2)
    D = torch.zeros(2, 7, 1, 16, 3)  # [G, B, K, T, p]
    f = ConvFactor(0, None, (call,), D, 18)
    assert f.A.shape == (2, 7, 16, 18)
    per_sample = 2 * 16 * 18 * 4  # G T d float32 bytes
    cases = [(1, 7, 1), (1, 3, 3), (per_sample * 3 - 1, 7, 2), (per_sample * 3, 7, 3),
             (2**30, 7, 7)]  # fmt: skip
    for budget, most, expected in cases:
        monkeypatch.setattr(_layers, "CONV_CHUNK_BYTES", budget)
        monkeypatch.setattr(_layers, "CONV_MAX_CHUNKS", most)
        assert f.chunk() == expected
