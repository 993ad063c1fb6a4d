"""Kernel numerics on CPU through the Triton interpreter.

Run by ``test_kernels.py`` in a subprocess with ``TRITON_INTERPRET=1`` (the variable must be set
before Triton is imported, so these tests cannot share the main test process). Not collected by
a plain ``pytest`` run (its name does not match ``test_*.py``); run it directly with
``TRITON_INTERPRET=1 python -m pytest tests/kernels/interp_kernels.py``.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from jdoptim import kernels  # noqa: E402
from jdoptim.gramian import JacobianEngine, LayerwiseGramianEngine, accumulate_gram  # noqa: E402

if not kernels.INTERPRET:
    pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _exact_gram(acc: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``acc + block block^T`` in float64 from the values ``block`` holds (its own dtype)."""
    b = block.double()
    return acc.double() + b @ b.T


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "split_k"),
    [(1, 1, 0), (5, 37, 0), (16, 64, 1), (17, 130, 3), (33, 65, 2), (70, 200, 4)],
)
def test_gram_matches_float64_and_is_symmetric(dtype, m, n, split_k):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    block = torch.randn(m, n, generator=gen).to(dtype)
    acc = torch.randn(m, m, generator=gen)
    acc = acc + acc.T
    before = acc.clone()
    out = kernels.gram_accumulate(acc, block, split_k=split_k)
    assert out.dtype == torch.float32 and out.shape == (m, m)
    # float32 accumulation of exact products: error ~ n * 2**-24, far below a bf16 rounding.
    assert _rel_err(out, _exact_gram(acc, block)) < 1e-5
    assert torch.equal(out, out.T)  # upper tiles mirrored, diagonal tiles symmetrised
    assert torch.equal(acc, before)  # functional: acc is not modified


def test_gram_non_contiguous_block_and_split_invariance():
    base = torch.randn(90, 41)
    block = base.T[:, ::2]  # [41, 45], strides (1, 82)
    acc = torch.zeros(41, 41)
    outs = [kernels.gram_accumulate(acc, block, split_k=s) for s in (1, 2, 7)]
    for out in outs:
        assert _rel_err(out, _exact_gram(acc, block)) < 1e-5
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)


def test_gram_autograd_matches_torch():
    block = torch.randn(19, 23, requires_grad=True)
    acc = torch.randn(19, 19, requires_grad=True)
    up = torch.randn(19, 19)
    (kernels.gram_accumulate(acc, block) * up).sum().backward()
    g_block, g_acc = block.grad.clone(), acc.grad.clone()
    block.grad = acc.grad = None
    (kernels.gram_accumulate_reference(acc, block) * up).sum().backward()
    torch.testing.assert_close(g_block, block.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_acc, acc.grad)


def _exact_linear(A, D, bias):
    return kernels.linear_gram_reference(A.double(), D.double(), bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("G", "B", "K", "T", "d", "p", "bias"),
    [
        (1, 1, 1, 1, 1, 1, False),  # smallest
        (1, 37, 1, 1, 20, 9, True),  # plain form, B not a multiple of the tile
        (1, 70, 1, 1, 70, 66, False),  # several tiles, d and p over one block
        (1, 7, 1, 3, 5, 4, True),  # sequence form, odd T
        (2, 6, 2, 5, 17, 33, True),  # groups, two losses per sample
        (1, 3, 1, 70, 4, 5, False),  # T over one tile (one sample per tile)
    ],
)
def test_linear_gram_matches_float64(dtype, G, B, K, T, d, p, bias):
    gen = torch.Generator().manual_seed(B * 100 + T)
    A = torch.randn(G, B, T, d, generator=gen).to(dtype)
    D = torch.randn(G, B, K, T, p, generator=gen).to(dtype)
    out = kernels.linear_gram(A, D, bias)
    assert out.dtype == torch.float32 and out.shape == (B, K, B, K)
    assert _rel_err(out, _exact_linear(A, D, bias)) < 1e-5
    flat = out.reshape(B * K, B * K)
    assert torch.equal(flat, flat.T)


def test_linear_gram_non_contiguous_inputs():
    # The layouts ConvRule builds: permuted views.
    A = torch.randn(6, 2, 9, 3).permute(1, 0, 2, 3)  # [G=2, B=6, T=9, d=3]
    D = torch.randn(6, 2, 2, 4, 9).permute(2, 0, 1, 4, 3)  # [G=2, B=6, K=2, T=9, p=4]
    assert not A.is_contiguous() and not D.is_contiguous()
    out = kernels.linear_gram(A, D, True)
    assert _rel_err(out, _exact_linear(A, D, True)) < 1e-5


def test_per_sample_linear_gram_is_the_gramian_of_per_sample_gradients():
    a, delta = torch.randn(11, 4, 6), torch.randn(11, 4, 3)
    J = torch.cat([torch.einsum("btp,btd->bpd", delta, a).flatten(1), delta.sum(1)], dim=1)
    out = kernels.per_sample_linear_gram(a, delta, bias=True)
    assert _rel_err(out, (J @ J.T).double()) < 1e-5


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 20),
    K=st.integers(1, 2),
    T=st.integers(1, 9),
    d=st.integers(1, 40),
    p=st.integers(1, 40),
    bias=st.booleans(),
)
def test_linear_gram_random_shapes(B, K, T, d, p, bias):
    A, D = torch.randn(1, B, T, d), torch.randn(1, B, K, T, p)
    assert _rel_err(kernels.linear_gram(A, D, bias), _exact_linear(A, D, bias)) < 1e-5


@pytest.fixture
def cpu_kernels():
    assert kernels.enable("cpu")
    yield
    kernels.disable("cpu")


def _per_sample(out, y):
    return ((out - y) ** 2).flatten(1).sum(1)  # one loss per sample


def _per_position(out, y):
    return ((out - y) ** 2).sum(-1)  # [B, T]: K = T losses per sample


def _gramians(net, x, y, loss):
    params = list(net.parameters())
    layerwise = LayerwiseGramianEngine(net, strategy="ghost")
    g_layer = layerwise.compute(loss(net(x), y), params).gramian
    layerwise.remove()
    g_jac = JacobianEngine().compute(loss(net(x), y).flatten(), params).gramian
    return g_layer, g_jac


def test_engines_use_the_kernels_and_agree_with_torch(cpu_kernels):
    from jdoptim.gramian import register_gram_kernel, register_linear_gram_kernel

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    conv = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(24, 2))
    cases = [
        (mlp, torch.randn(9, 5), torch.randn(9, 3), _per_sample),  # T = 1
        (mlp, torch.randn(4, 3, 5), torch.randn(4, 3, 3), _per_sample),  # sequence form, T = 3
        (mlp, torch.randn(4, 3, 5), torch.randn(4, 3, 3), _per_position),  # K = 3, T = 3
        (conv, torch.randn(6, 2, 8), torch.randn(6, 2), _per_sample),  # grouped convolution
    ]
    calls = {"linear": 0, "gram": 0}

    def counted(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)

        return wrapped

    register_linear_gram_kernel("cpu", counted("linear", kernels.linear_gram))
    register_gram_kernel("cpu", counted("gram", kernels.gram_accumulate))
    with_kernels = [_gramians(*case) for case in cases]
    # The linear kernel implements the pairwise order: the T = 1 and sequence cases call it for
    # both layers; the K = 3 case and the convolution (p < T) are cheaper kernel-first (torch).
    assert calls["linear"] >= 5 and calls["gram"] >= 2 * len(cases)
    kernels.disable("cpu")
    for case, got in zip(cases, with_kernels, strict=True):
        for g, ref in zip(got, _gramians(*case), strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


def test_accumulate_gram_hook_compiles_through_an_opaque_custom_op():
    """The registration hook under ``torch.compile(fullgraph=True)`` on CPU. A ``triton_op``
    cannot be compiled on CPU in interpreter mode, so the kernel is wrapped in an opaque
    ``custom_op`` here; the ``triton_op`` compile path itself is checked on a GPU by
    ``bench/gpu_check.py``."""

    @torch.library.custom_op("jdoptim_test::gram_interp", mutates_args=())
    def gram_interp(acc: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return kernels.gram_accumulate(acc, block)

    @gram_interp.register_fake
    def _(acc, block):
        return torch.empty_like(acc)

    from jdoptim.gramian import register_gram_kernel

    def fn(b1, b2):
        acc = torch.zeros(b1.shape[0], b1.shape[0])
        return accumulate_gram(accumulate_gram(acc, b1), b2)

    register_gram_kernel("cpu", gram_interp)
    try:
        torch._dynamo.reset()
        b1, b2 = torch.randn(9, 30), torch.randn(9, 17).bfloat16()
        assert torch._dynamo.explain(fn)(b1, b2).graph_break_count == 0
        compiled = torch.compile(fn, fullgraph=True)
        expected = _exact_gram(_exact_gram(torch.zeros(9, 9), b1), b2)
        assert _rel_err(compiled(b1, b2), expected) < 1e-5
        b1, b2 = torch.randn(9, 30), torch.randn(9, 17).bfloat16()  # new values: no recompile
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(b1, b2)
        assert _rel_err(out, _exact_gram(_exact_gram(torch.zeros(9, 9), b1), b2)) < 1e-5
    finally:
        register_gram_kernel("cpu", None)
        torch._dynamo.reset()
