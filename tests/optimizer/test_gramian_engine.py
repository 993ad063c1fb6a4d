"""The Jacobian engine: Gramian, weighted gradient, chunking, dtypes, registry and kernel hook."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.gramian import (
    GramianEngine,
    JacobianEngine,
    accumulate_gram,
    available_engines,
    register_engine,
    register_gram_kernel,
    resolve_engine,
    to_generalized_gramian,
)

from ._helpers import data, jacobian_rows, mlp, task_losses


def _losses_and_params(m: int, seed: int = 0):
    model = mlp(seed=seed, d_out=m)
    x, y = data(seed=seed + 1, d_out=m)
    return task_losses(model, x, y), list(model.parameters())


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 6), chunk=st.sampled_from([None, 1, 2, 3, 5]), seed=st.integers(0, 100))
def test_gramian_and_weighted_gradient_match_per_row_autograd(m, chunk, seed):
    losses, params = _losses_and_params(m, seed)
    J = jacobian_rows(losses, params)
    result = JacobianEngine(chunk_size=chunk).compute(losses, params, retain_graph=True)
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.jacobian(), J, rtol=1e-5, atol=1e-6)
    w = torch.randn(m, generator=torch.Generator().manual_seed(seed))
    expected = torch.autograd.grad(losses, params, grad_outputs=w)
    for got, exp in zip(result.weighted_gradient(w), expected, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_split_inverts_the_jacobian_layout():
    losses, params = _losses_and_params(3)
    result = JacobianEngine().compute(losses, params)
    v = torch.arange(float(sum(p.numel() for p in params)))
    parts = result.split(v)
    assert [p.shape for p in parts] == [p.shape for p in params]
    assert torch.equal(torch.cat([p.reshape(-1) for p in parts]), v)


def test_unreached_parameter_has_no_jacobian_and_chunks_fill_zeros():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    z = torch.tensor([3.0], requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    losses = torch.stack([x.sum(), (z * 2).sum(), (x * z).sum()])
    result = JacobianEngine(chunk_size=1).compute(losses, [x, z, unused])
    assert result.jacobians[2] is None
    assert result.weighted_gradient(torch.ones(3))[2] is None
    # z is not reached by row 0: that row of its Jacobian is zero, not missing.
    torch.testing.assert_close(result.jacobians[1].reshape(3), torch.tensor([0.0, 2.0, 3.0]))
    J = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0], [3.0, 3.0, 3.0]])
    torch.testing.assert_close(result.gramian, J @ J.T)


def test_bf16_jacobian_accumulates_gramian_in_float32():
    model = mlp().to(torch.bfloat16)
    x, y = data()
    losses = task_losses(model, x.bfloat16(), y.bfloat16())
    params = list(model.parameters())
    result = JacobianEngine().compute(losses, params, retain_graph=True)
    assert result.gramian.dtype == torch.float32
    J = torch.cat([j.reshape(3, -1).double() for j in result.jacobians], dim=1)
    torch.testing.assert_close(result.gramian.double(), J @ J.T, rtol=1e-6, atol=1e-6)
    assert result.weighted_gradient(torch.ones(3))[0].dtype == torch.bfloat16


def test_accumulate_gram_and_kernel_hook():
    calls = []

    def kernel(acc, block):
        calls.append(block.shape)
        return acc + 2 * block @ block.T

    b = torch.randn(3, 4)
    torch.testing.assert_close(accumulate_gram(torch.eye(3), b), torch.eye(3) + b @ b.T)
    register_gram_kernel("cpu", kernel)
    try:
        out = accumulate_gram(torch.zeros(3, 3), b)
    finally:
        register_gram_kernel("cpu", None)
    assert calls == [(3, 4)]
    torch.testing.assert_close(out, 2 * b @ b.T)


def test_generalized_gramian_definition():
    t = torch.randn(2, 3, 4)
    flat = t.reshape(6, 4)
    gg = to_generalized_gramian(flat @ flat.T, (2, 3))
    torch.testing.assert_close(gg, torch.einsum("abi,dci->abcd", t, t))
    with pytest.raises(ValueError, match="Cannot view"):
        to_generalized_gramian(flat @ flat.T, (4, 2))


def test_engine_validation_and_registry():
    with pytest.raises(ValueError, match="chunk_size"):
        JacobianEngine(chunk_size=0)
    with pytest.raises(ValueError, match="flat vector"):
        JacobianEngine().compute(torch.ones(2, 2, requires_grad=True), [])
    with pytest.raises(ValueError, match="Unknown engine"):
        resolve_engine("nope")
    with pytest.raises(ValueError, match="reserved"):
        register_engine("auto", JacobianEngine)
    assert isinstance(resolve_engine("auto"), JacobianEngine)
    assert resolve_engine("jacobian", chunk_size=3).chunk_size == 3

    class NoJacobian(GramianEngine):
        def compute(self, losses, params, *, retain_graph=False):
            raise AssertionError

    with pytest.raises(ValueError, match="does not materialise"):
        resolve_engine(NoJacobian(), needs_jacobian=True)
    register_engine("test-jacobian", lambda chunk_size=None: JacobianEngine(chunk_size))
    assert "test-jacobian" in available_engines()
    assert resolve_engine("test-jacobian", chunk_size=2).chunk_size == 2
