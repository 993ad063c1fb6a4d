"""Multi-task engine: exact against the full Jacobian, structure checks, errors, compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting
from jdoptim.gramian import JacobianEngine, MultiTaskGramianEngine
from jdoptim.gramian._layers import Dims, LinearFactor

from ._exact import assert_matches_jacobian

STRATEGIES = ["auto", "ghost", "materialize"]


class MTL(nn.Module):
    """Trunk (Linear/ReLU/LayerNorm/Linear) + one head per task; ``deep`` heads are 2-layer MLPs."""

    def __init__(self, n_tasks: int, d_in: int = 5, width: int = 7, deep: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.LayerNorm(width), nn.Linear(width, width),
            nn.Tanh(),
        )  # fmt: skip
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 3), nn.Tanh(), nn.Linear(3, 2)) if deep
            else nn.Linear(width, 2)
            for _ in range(n_tasks)
        )  # fmt: skip

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def task_losses(outputs: list[Tensor], y: Tensor) -> Tensor:
    """Loss ``k`` from head ``k`` only (mixed reductions, as real tasks have)."""
    losses = []
    for k, out in enumerate(outputs):
        if k % 2 == 0:
            losses.append(((out - y[..., k : k + 1]) ** 2).mean())
        else:
            losses.append(torch.nn.functional.softplus(out).sum() / out.shape[0])
    return torch.stack(losses)


def assert_exact(engine: MultiTaskGramianEngine, losses: Tensor, params: list[Tensor]) -> None:
    """Gramian and weighted gradient == the brute-force Jacobian's, to 1e-10 (float64)."""
    assert_matches_jacobian(engine.compute(losses, params, retain_graph=True), losses, params)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("shape", [(9, 5), (4, 6, 5)])  # a batch, or a batch of sequences
def test_exact_against_the_jacobian(strategy: str, deep: bool, shape: tuple) -> None:
    torch.manual_seed(len(shape) * 10 + deep)
    model = MTL(3, deep=deep).double()
    engine = MultiTaskGramianEngine(model.trunk, model.heads, strategy=strategy)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    losses = task_losses(model(x), y)
    assert_exact(engine, losses, list(model.parameters()))
    engine.remove()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
def test_chunked_trunk_backward_is_exact(chunk_size: int) -> None:
    torch.manual_seed(6)
    model = MTL(5).double()
    engine = MultiTaskGramianEngine(model.trunk, model.heads, chunk_size=chunk_size)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    assert_exact(engine, task_losses(model(x), y), list(model.parameters()))
    assert repr(engine) == (
        f"MultiTaskGramianEngine(n_tasks=5, strategy='auto', chunk_size={chunk_size})"
    )


def test_partial_params_and_parameters_outside_trunk_and_heads() -> None:
    """A learnable per-task scale (in no module of the engine) is exact through the fallback; a
    subset of the parameters gets only its own blocks."""
    torch.manual_seed(1)
    model = MTL(4).double()
    scale = nn.Parameter(torch.rand(4, dtype=torch.float64) + 0.5)
    engine = MultiTaskGramianEngine(model.trunk, model.heads)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    losses = task_losses(model(x), y) * scale
    params = [scale, *model.trunk[3].parameters(), *model.heads[2].parameters()]
    assert_exact(engine, losses, params)


def test_trunk_called_twice_and_heads_on_different_features() -> None:
    """A trunk Linear used twice (positions concatenated) and heads reading two different
    tensors (each gets its own cotangents)."""
    torch.manual_seed(2)
    shared = nn.Linear(4, 4).double()
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(3)).double()
    engine = MultiTaskGramianEngine(shared, heads)
    x = torch.randn(6, 4, dtype=torch.float64)
    z1 = torch.tanh(shared(x))
    z2 = torch.tanh(shared(z1))
    outs = [heads[0](z1), heads[1](z2), heads[2](z2)]
    losses = torch.stack([(o**2).mean() for o in outs])
    assert_exact(engine, losses, [*shared.parameters(), *heads.parameters()])


def test_earlier_forward_passes_are_ignored() -> None:
    """Forward passes that no compute followed (an evaluation pass with grad on, another
    optimizer's step) leave calls the losses do not reach: they are dropped."""
    torch.manual_seed(5)
    model = MTL(3).double()
    engine = MultiTaskGramianEngine(model.trunk, model.heads)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    task_losses(model(x * 2), y).sum().backward()  # an earlier, unrelated forward + backward
    model(x + 1)  # and a forward with no backward at all
    assert_exact(engine, task_losses(model(x), y), list(model.parameters()))


def test_matches_jacobian_engine_in_jdoptimizer() -> None:
    """Five UPGrad steps: same parameters as with the Jacobian engine."""
    torch.manual_seed(3)
    models = [MTL(3), MTL(3)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    engines = [JacobianEngine(), MultiTaskGramianEngine(models[1].trunk, models[1].heads)]
    opts = [
        JDOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), UPGradWeighting(), engine=e
        )
        for m, e in zip(models, engines, strict=True)
    ]
    for _ in range(5):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            opt.step(task_losses(model(x), y))
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_structure_errors() -> None:
    model = MTL(2)
    with pytest.raises(ValueError, match="share a parameter"):
        MultiTaskGramianEngine(model.trunk, [model.heads[0], model.heads[0]])
    with pytest.raises(ValueError, match="both in the trunk and in head"):
        MultiTaskGramianEngine(model, model.heads)
    with pytest.raises(ValueError, match="strategy"):
        MultiTaskGramianEngine(model.trunk, model.heads, strategy="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heads"):
        MultiTaskGramianEngine(model.trunk, [])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            MultiTaskGramianEngine(model.trunk, model.heads, chunk_size=bad)  # type: ignore

    engine = MultiTaskGramianEngine(model.trunk, model.heads)
    params = list(model.parameters())
    x, y = torch.randn(5, 5), torch.randn(5, 2)
    # A loss that reads another task's head.
    outs = model(x)
    crossed = torch.stack([(outs[0] ** 2).mean(), (outs[0] * outs[1]).mean()])
    with pytest.raises(ValueError, match="Loss 1 depends on the output of head 0"):
        engine.compute(crossed, params)
    # Wrong number of losses.
    with pytest.raises(ValueError, match="one loss per head"):
        engine.compute(task_losses(model(x), y)[:1], params)
    # A head called twice between two computes.
    z = model.trunk(x)
    outs = [model.heads[0](z), model.heads[1](z), model.heads[1](z)]
    with pytest.raises(ValueError, match="Head 1 is called 2 times in the forward pass"):
        engine.compute(torch.stack([outs[0].mean(), (outs[1] * outs[2]).mean()]), params)
    with pytest.raises(ValueError, match="No head was called"):
        engine.compute(torch.stack([outs[0].mean(), outs[1].mean()]), params)
    # Records were dropped: a clean forward works again.
    result = engine.compute(task_losses(model(x), y), params)
    assert result.gramian.shape == (2, 2)
    with pytest.raises(ValueError, match="Expected 2 weights"):
        result.weighted_gradient(torch.ones(3))
    engine.remove()
    assert engine._handles == []


@settings(max_examples=30, deadline=None)
@given(
    G=st.integers(1, 2),
    B=st.integers(1, 3),
    K=st.integers(1, 4),
    T=st.integers(1, 5),
    bias=st.booleans(),
)
def test_linear_gram_orders_agree(G: int, B: int, K: int, T: int, bias: bool) -> None:
    """The kernel-first and pairwise ghost Gramians both equal the materialised one."""
    torch.manual_seed(G + 10 * B + 100 * K + 1000 * T)
    d, p = 3, 4
    factor = LinearFactor(
        0,
        1 if bias else None,
        torch.randn(G, B, T, d, dtype=torch.float64),
        torch.randn(G, B, K, T, p, dtype=torch.float64),
    )
    dims = Dims(B=B, K=K, batch_dim=0)
    J = torch.cat([g for g in factor.materialize().values()], dim=-1).reshape(B * K, -1)
    expected = (J @ J.T).reshape(B, K, B, K)
    from jdoptim.gramian import _layers

    for force in ("pairwise", "kernel_first"):
        original = _layers._kernel_first
        try:
            if force == "pairwise":
                _layers._kernel_first = lambda *a: _layers._pairwise(*a) + 1  # type: ignore
            else:
                _layers._kernel_first = lambda *a: -1  # type: ignore
            torch.testing.assert_close(factor.gram(dims), expected, rtol=1e-12, atol=1e-12)
        finally:
            _layers._kernel_first = original


def test_kernel_first_is_chosen_for_many_losses_over_positions() -> None:
    from jdoptim.gramian._layers import _kernel_first, _pairwise

    assert _kernel_first(1, 32, 128, 256) < _pairwise(1, 32, 128, 256) / 20
    assert _pairwise(64, 1, 1, 128) <= _kernel_first(64, 1, 1, 128)


def test_compile_fullgraph_matches_eager() -> None:
    torch.manual_seed(7)
    model = MTL(3, deep=True)
    params = list(model.parameters())
    engine = MultiTaskGramianEngine(model.trunk, model.heads)

    def step(x: Tensor, y: Tensor) -> Tensor:
        losses = task_losses(model(x), y)
        result = engine.compute(losses, params)
        w = torch.softmax(result.gramian.diagonal(), 0)
        for p, g in zip(params, result.weighted_gradient(w), strict=True):
            p.grad = g
        return result.gramian

    x, y = torch.randn(6, 5), torch.randn(6, 3)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        G_eager = step(x, y)
        g_eager = [p.grad.clone() for p in params]
        explained = torch._dynamo.explain(step)(x, y)
        assert explained.graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)
        G = compiled(x, y)
        torch.testing.assert_close(G, G_eager, rtol=1e-5, atol=1e-6)
        for p, g in zip(params, g_eager, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(torch.randn(6, 5), torch.randn(6, 3))


def test_whole_compiled_train_step_follows_eager_without_recompilation() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(8)
    models = [MTL(4), MTL(4)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        JDOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
            UPGradWeighting(),
            engine=MultiTaskGramianEngine(m.trunk, m.heads),
            nonfinite="propagate",
        )
        for m in models
    ]

    def make_step(model: nn.Module, opt: JDOptimizer):
        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad()
            return opt.step(task_losses(model(x), y))

        return step

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(make_step(models[0], opts[0]), backend=counter)
    eager = make_step(models[1], opts[1])
    frames = None
    for k in range(10):
        gen = torch.Generator().manual_seed(k)
        x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 4, generator=gen)
        torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-5, atol=1e-5)
        if k == 1:  # SGD creates its momentum buffers on the first step: one recompile there
            frames = counter.frame_count
    assert counter.frame_count == frames  # no recompilation in the steady state
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
