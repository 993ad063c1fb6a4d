"""Triton kernels: interpreter numerics (subprocess), GPU lowering without a GPU, torch fallback,
validation and registration."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim import kernels
from jdoptim.gramian._kernels import _KERNELS, linear_gram_kernel
from jdoptim.kernels import gram, per_sample_gram

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")


@needs_triton
def test_kernels_under_the_triton_interpreter():
    """``interp_kernels.py`` in a fresh process with ``TRITON_INTERPRET=1`` (the variable is
    read when Triton is imported, so it cannot be switched on in this process)."""
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "JDOPTIM_TEST_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", str(here / "interp_kernels.py")],
        cwd=here.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _gpu_target():
    triton = pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend")
    from triton.backends.compiler import GPUTarget

    return triton, GPUTarget("cuda", 90, 32)  # H100


def _aot(triton, target, fn, pointers: dict[str, str], constexprs: dict) -> None:
    from triton.compiler import ASTSource

    names = inspect.signature(fn.fn).parameters
    signature = {n: "i32" for n in names} | pointers | {c: "constexpr" for c in constexprs}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target)
    assert compiled.asm.get("cubin")


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_kernels_lower_to_sm90_machine_code(dtype):
    """Ahead-of-time compilation for an H100 (no GPU needed): catches what the interpreter
    accepts but the compiler does not (types, layouts, reshapes, control flow)."""
    triton, target = _gpu_target()
    for block_m, ieee in [(16, False), (64, dtype == "fp32")]:
        _aot(
            triton,
            target,
            gram._gram_kernel,
            {"J": f"*{dtype}", "P": "*fp32"},
            {"BLOCK_M": block_m, "BLOCK_K": 64, "IEEE": ieee, "UPCAST": False},
        )
    for bb, tt in [(64, 1), (16, 4), (1, 64)]:
        _aot(
            triton,
            target,
            per_sample_gram._linear_gram_kernel,
            {"A": f"*{dtype}", "D": f"*{dtype}", "Out": "*fp32"},
            {
                "BIAS": tt != 4,
                "BB": bb,
                "TT": tt,
                "ROWS": bb * tt,
                "BLOCK_D": 32,
                "BLOCK_P": 64,
                "IEEE": dtype == "fp32",
                "UPCAST": False,
            },
        )


# --------------------------------------------------------------------------- torch fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gram_accumulate_on_cpu(dtype):
    block = torch.randn(7, 13).to(dtype)
    acc = torch.randn(7, 7, dtype=torch.promote_types(dtype, torch.float32))
    out = kernels.gram_accumulate(acc, block)
    b = block.double()
    torch.testing.assert_close(out.double(), acc.double() + b @ b.T, rtol=1e-5, atol=1e-5)
    assert out.dtype == acc.dtype


def test_gram_accumulate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="matrix"):
        kernels.gram_accumulate(torch.zeros(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"should have shape \(3, 3\)"):
        kernels.gram_accumulate(torch.zeros(2, 2), torch.zeros(3, 4))


def _per_sample_jacobian(A, D, bias):
    """Per-sample gradients ``[B K, n]`` of the (grouped) linear layer, materialised."""
    B, K = D.shape[1], D.shape[2]
    W = torch.einsum("gbktp,gbtd->bkgpd", D, A).reshape(B * K, -1)
    if not bias:
        return W
    return torch.cat([W, D.sum(3).permute(1, 2, 0, 3).reshape(B * K, -1)], dim=1)


@settings(max_examples=25, deadline=None)
@given(
    G=st.integers(1, 3),
    B=st.integers(1, 6),
    K=st.integers(1, 3),
    T=st.integers(1, 4),
    d=st.integers(1, 5),
    p=st.integers(1, 5),
    bias=st.booleans(),
)
def test_linear_gram_is_the_gramian_of_per_sample_gradients(G, B, K, T, d, p, bias):
    A = torch.randn(G, B, T, d, dtype=torch.float64)
    D = torch.randn(G, B, K, T, p, dtype=torch.float64)
    J = _per_sample_jacobian(A, D, bias)
    out = kernels.linear_gram(A, D, bias).reshape(B * K, B * K)
    torch.testing.assert_close(out, J @ J.T, rtol=1e-10, atol=1e-10)


def test_linear_gram_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[G, B, T, d\]"):
        kernels.linear_gram(torch.zeros(2, 3, 4), torch.zeros(1, 2, 1, 3, 4))
    with pytest.raises(ValueError, match="disagree"):
        kernels.linear_gram(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, T, p\]"):
        kernels.per_sample_linear_gram(torch.zeros(2, 3), torch.zeros(3, 3))


def test_per_sample_linear_gram_plain_form():
    a, delta = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    expected = (a @ a.T + 1) * (delta @ delta.T)
    torch.testing.assert_close(kernels.per_sample_linear_gram(a, delta, bias=True), expected)


# ------------------------------------------------------------------------ plans, registration


@given(m=st.integers(1, 300), n=st.integers(1, 10**7), split_k=st.integers(0, 5000))
def test_gram_plan_covers_every_column_once(m, n, split_k):
    block_m, block_k, splits, per_split = gram._plan(m, n, torch.device("cpu"), split_k)
    assert block_m in (16, 32, 64) and (block_m >= m or block_m == 64)
    assert per_split % block_k == 0 and splits >= 1
    assert (splits - 1) * per_split < n <= splits * per_split  # no empty chunk, none missing
    if split_k > 0:
        assert splits <= split_k


@given(B=st.integers(1, 300), T=st.integers(1, 500), d=st.integers(1, 999), p=st.integers(1, 9))
def test_linear_gram_plan_tiles(B, T, d, p):
    bb, tt, block_d, block_p = per_sample_gram._plan(B, T, d, p)
    rows = bb * tt
    assert rows & (rows - 1) == 0 and 16 <= rows <= 64  # tl.dot needs >= 16 rows
    assert tt >= min(T, 64) and bb >= 1
    assert 16 <= block_d <= 64 and 16 <= block_p <= 64


def test_enable_and_disable_register_the_hooks():
    try:
        assert kernels.enable("meta") == kernels.HAS_TRITON
        if kernels.HAS_TRITON:
            assert _KERNELS["meta"] is kernels.gram_accumulate
            assert linear_gram_kernel("meta") is kernels.linear_gram
    finally:
        kernels.disable("meta")
    assert "meta" not in _KERNELS and linear_gram_kernel("meta") is None


def test_cpu_tensors_use_torch_outside_the_interpreter():
    from jdoptim.kernels._common import launchable

    assert launchable(torch.zeros(1)) == (kernels.HAS_TRITON and kernels.INTERPRET)
    assert not launchable(torch.zeros(1), torch.zeros(1, device="meta"))
