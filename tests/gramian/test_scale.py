"""The float32 Gramian cannot overflow: losses scaled by 2^k (k up to 120, every plain gradient
finite) give a finite Gramian equal to 2^(2k) times the unscaled one once its exponent is applied,
and a weighted gradient exactly 2^k times the unscaled one, for every engine."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim.gramian import JacobianEngine, LayerwiseGramianEngine, MultiTaskGramianEngine
from jdoptim.gramian._kernels import register_linear_gram_kernel

KS = [-90, -40, 0, 40, 66, 100, 120]


def per_sample_setup(strategy: str):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.LayerNorm(5),
        nn.Linear(5, 2),
    )  # fmt: skip
    engine = LayerwiseGramianEngine(model, strategy=strategy)
    idx = torch.randint(0, 7, (6, 3))
    y = torch.randn(6, 2)

    def losses() -> Tensor:
        return (model(idx) - y) ** 2  # [B, 2]

    return engine, list(model.parameters()), losses


def conv_setup(strategy: str):
    """Convolutions over many positions (per-sample gradients stored) and few (formed)."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=3), nn.Flatten(),
    )  # fmt: skip
    engine = LayerwiseGramianEngine(model, strategy=strategy)
    x = torch.randn(4, 2, 9, 9)

    def losses() -> Tensor:
        return (model(x) ** 2).reshape(4, 2, 9).sum(2)  # [B, 2]

    return engine, list(model.parameters()), losses


def multitask_setup(strategy: str):
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    heads = nn.ModuleList(nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1)) for _ in "ab")
    engine = MultiTaskGramianEngine(trunk, heads, strategy=strategy)
    x = torch.randn(8, 4)

    def losses() -> Tensor:
        z = trunk(x)
        return torch.stack([(h(z) ** 2).mean() for h in heads])

    return engine, [*trunk.parameters(), *heads.parameters()], losses


def jacobian_setup(strategy: str):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4, 3)

    def losses() -> Tensor:
        return (model(x) ** 2).mean(0)

    chunk = {"auto": None, "ghost": 2, "materialize": 1}[strategy]
    return JacobianEngine(chunk_size=chunk), list(model.parameters()), losses


SETUPS = {
    "jacobian": jacobian_setup,
    "layerwise": per_sample_setup,
    "conv": conv_setup,
    "multitask": multitask_setup,
}


def run(setup, strategy: str, k: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    engine, params, losses_fn = setup(strategy)
    losses = losses_fn() * 2.0**k
    result = engine.compute(losses, params)
    w = torch.linspace(0.5, 1.5, losses.numel())
    grads = [torch.zeros_like(p) if g is None else g for g, p in
             zip(result.weighted_gradient(w), params, strict=True)]  # fmt: skip
    exponent = torch.zeros((), dtype=torch.int32)
    if getattr(result, "gramian_exponent", None) is not None:
        exponent = result.gramian_exponent
    return result.gramian, exponent, grads


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_scaled_losses_scale_the_results_exactly(name: str, strategy: str) -> None:
    G0, e0, g0 = run(SETUPS[name], strategy, 0)
    assert int(e0) == 0  # the normal range: the Gramian itself
    assert G0.dtype == torch.float32
    # The Jacobian engine scales the losses down, never up (tiny losses may have moderate
    # gradients): its Gramian of gradients below ~2^-63 underflows as before.
    for k in [k for k in KS if k >= 0 or name != "jacobian"]:
        G, e, grads = run(SETUPS[name], strategy, k)
        assert torch.isfinite(G).all(), (name, k)
        assert G.abs().max() > 0
        # G * 2^e == 2^(2k) G0, i.e. G == G0 * 2^(2k - e): a power of two, so exactly.
        expected = G0.double() * 2.0 ** (2 * k - int(e))
        torch.testing.assert_close(G.double(), expected, rtol=0, atol=0)
        for g, ref in zip(grads, g0, strict=True):
            torch.testing.assert_close(g.double(), ref.double() * 2.0**k, rtol=0, atol=0)
            assert torch.isfinite(g).all()


def test_the_fused_kernel_path_is_scaled_too() -> None:
    """A registered linear Gram kernel (here a torch stand-in for the CUDA one) gets scaled
    inputs, the bias as one more input column."""

    def kernel(A: Tensor, D: Tensor, bias: bool) -> Tensor:
        G_, B, T, d = A.shape
        AA = A.reshape(G_, B * T, d) @ A.reshape(G_, B * T, d).mT + (1 if bias else 0)
        K, p = D.shape[2], D.shape[-1]
        DD = D.reshape(G_, B * K * T, p) @ D.reshape(G_, B * K * T, p).mT
        prod = DD.reshape(G_, B, K, T, B, K, T) * AA.reshape(G_, B, 1, T, B, 1, T)
        return prod.sum(dim=(0, 3, 6))

    register_linear_gram_kernel("cpu", kernel)
    try:
        test_scaled_losses_scale_the_results_exactly("layerwise", "ghost")
    finally:
        register_linear_gram_kernel("cpu", None)


def test_bfloat16_jacobian_blocks() -> None:
    """bf16 Jacobians of losses scaled by 2^-100 (float32 Gramian): the results are those of
    the losses themselves, exactly."""
    from jdoptim.gramian import JacobianResult

    torch.manual_seed(3)
    J = torch.randn(3, 5).to(torch.bfloat16)
    params = [torch.zeros(5, dtype=torch.bfloat16)]
    plain = JacobianResult(params, [J], 3)
    result = JacobianResult(params, [J], 3, loss_shift=torch.tensor(100))
    e = int(result.gramian_exponent)
    assert e > 0 and torch.isfinite(result.gramian).all()
    expected = plain.gramian.double() * 2.0 ** (200 - e)
    torch.testing.assert_close(result.gramian.double(), expected, rtol=0, atol=0)
    assert torch.equal(result.jacobians[0].double(), J.double() * 2.0**100)
    w = torch.tensor([0.5, -1.0, 2.0])
    g = result.weighted_gradient(w)[0].double()
    assert torch.equal(g, plain.weighted_gradient(w)[0].double() * 2.0**100)


def test_compiled_gramian_skips_the_unit_scaling_exactly() -> None:
    """Compiled for the CPU, the materialised per-sample gradients are multiplied by 2^-shift
    only when the shift is not 0 (``torch.cond``): one graph serves both (no recompilation),
    with eager's results. The ``aot_eager`` backend keeps the test fast; Inductor compiles the
    same graph in ``test_modules.py::test_compile_fullgraph_matches_eager``."""
    engine, params, losses_fn = per_sample_setup("materialize")

    def gramian(k: Tensor) -> tuple[Tensor, Tensor]:
        result = engine.compute(losses_fn() * torch.ldexp(torch.ones(()), k), params)
        return result.gramian, result.gramian_exponent

    torch._dynamo.reset()
    compiled = torch.compile(gramian, fullgraph=True, dynamic=False, backend="aot_eager")
    for k in (0, 100, 0):
        kt = torch.tensor(k)
        with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=True):
            G, e = compiled(kt)
        G_eager, e_eager = gramian(kt)
        assert int(e) == int(e_eager) and (int(e) == 0) == (k == 0)
        # float32 kernels fused differently: agreement to rounding, not bitwise
        torch.testing.assert_close(G, G_eager, rtol=1e-4, atol=1e-6 * float(G_eager.abs().max()))


def test_exponents_at_once_equal_one_by_one() -> None:
    """``exponents`` (all tensors' reductions stacked) == ``exponent`` per tensor: empty,
    zero, non-finite, float64 beyond float32's range, integers."""
    from jdoptim.gramian._scale import exponent, exponents

    torch.manual_seed(0)
    xs = [
        torch.randn(3, 4) * 2.0**40,
        torch.zeros(0),
        torch.zeros(2, 2),
        torch.tensor([1.0, float("inf")]),
        torch.tensor([float("nan"), 2.0]),
        torch.tensor([-3.0, 0.5], dtype=torch.float64),
        torch.tensor([1e300], dtype=torch.float64),
        torch.tensor([-(2.0**-140), 2.0**-141], dtype=torch.float64),
        torch.tensor([5, -7]),
    ]
    assert [int(e) for e in exponents(xs)] == [int(exponent(x)) for x in xs]
    assert exponents([]) == []
    # float64 beyond float32's range keeps its exponent (not that of inf or 0, which is 0).
    big, tiny = (
        torch.tensor([1e300], dtype=torch.float64),
        torch.tensor([1e-300], dtype=torch.float64),
    )
    assert (int(exponent(big)), int(exponent(tiny))) == (997, -996)
    assert [int(e) for e in exponents([big, tiny, torch.ones(2)])] == [997, -996, 1]


def test_float64_gradients_beyond_float32_range_are_scaled() -> None:
    """float64 losses of 1e250: the Gramian stays finite and is the small losses' one times
    10^500 / 2^gramian_exponent (the gradients' exponent is read in float64, not float32)."""
    from fractions import Fraction

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = LayerwiseGramianEngine(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    params = list(model.parameters())
    small = engine.compute((model(x) ** 2).sum(1), params)
    big = engine.compute((model(x) ** 2).sum(1) * 1e250, params)
    e = int(big.gramian_exponent)
    assert torch.isfinite(big.gramian).all() and e > 0 and int(small.gramian_exponent) == 0
    factor = float(Fraction(1e250) ** 2 / 2**e)  # exact, then rounded once
    torch.testing.assert_close(big.gramian, small.gramian * factor, rtol=1e-12, atol=0)
    engine.remove()


def test_stored_gradients_bound_read_side_by_side() -> None:
    """Small stored per-sample gradients are read side by side for their bound: the largest
    exponent among them, whichever holds it (and with a large one and a bounded one)."""
    from jdoptim.gramian._layers import JOIN_NUMEL, PerSample
    from jdoptim.gramian._scale import exponent

    grads = {i: torch.randn(3, 2, 4 + i) * 2.0 ** (10 * i - 20) for i in range(4)}
    grads[4] = torch.randn(3, 2, JOIN_NUMEL)  # large: read on its own
    for top in range(5):
        gs = dict(grads)
        gs[top] = gs[top] * 2.0**60
        f = PerSample(gs)
        assert len(f.exponent_inputs()) == 2
        assert int(f.exponent()) == max(int(exponent(J)) for J in gs.values())
    f.add({5: torch.ones(3, 2, 1)}, torch.tensor(200, dtype=torch.int32))
    assert int(f.exponent()) == 200
