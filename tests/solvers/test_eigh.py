"""The sync-free Jacobi eigensolver against torch.linalg.eigh / pinv."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.solvers.eigh import (
    _round_robin_permutation,
    default_sweeps,
    eig_method,
    psd_pinv,
    psd_pinv_apply,
    symmetric_eig,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _jacobi_on_cpu():
    """These tests are about the sync-free Jacobi solver: use it on the CPU too."""
    with eig_method("jacobi"):
        yield


def _orthogonal(m: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    return q


def make_matrix(kind: str, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # indefinite
        x = torch.randn(m, m, generator=g, dtype=F64)
        return x + x.T
    if kind == "gram":
        j = torch.randn(m, 2 * m + 1, generator=g, dtype=F64)
        return j @ j.T
    if kind == "rank_deficient":
        j = torch.randn(m, max(1, m // 3), generator=g, dtype=F64)
        return j @ j.T
    if kind == "clustered":  # two clusters of width 1e-9
        lam = torch.cat([torch.ones(m // 2), 2 * torch.ones(m - m // 2)]).to(F64)
        lam = lam + 1e-9 * torch.randn(m, generator=g, dtype=F64)
        q = _orthogonal(m, g)
        return q @ torch.diag(lam) @ q.T
    if kind == "ill_conditioned":  # eigenvalues spread evenly over 10 decades
        lam = torch.logspace(0, -10, m, dtype=F64)
        q = _orthogonal(m, g)
        return q @ torch.diag(lam) @ q.T
    raise ValueError(kind)


KINDS = ("random", "gram", "rank_deficient", "clustered", "ill_conditioned")
SIZES = (1, 2, 3, 4, 7, 16, 33, 64)


def _check_decomposition(A: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor, tol: float):
    ref = torch.linalg.eigvalsh(A)
    scale = ref.abs().max().clamp(min=1e-300)
    assert bool((vals[1:] >= vals[:-1]).all()), "eigenvalues must be ascending"
    assert (vals - ref).abs().max() <= tol * scale
    m = A.shape[-1]
    eye = torch.eye(m, dtype=A.dtype)
    assert (vecs.mT @ vecs - eye).abs().max() <= 1e-12 * m
    assert (vecs @ torch.diag(vals) @ vecs.mT - A).norm() <= tol * A.norm()


@pytest.mark.parametrize(("kind", "m"), list(itertools.product(KINDS, SIZES)))
def test_matches_eigh(kind: str, m: int) -> None:
    A = make_matrix(kind, m)
    vals, vecs = symmetric_eig(A)
    assert vals.dtype == vecs.dtype == F64
    _check_decomposition(A, vals, vecs, tol=1e-10)


def test_matches_eigh_m256() -> None:
    A = make_matrix("gram", 256, seed=3)
    vals, vecs = symmetric_eig(A)
    _check_decomposition(A, vals, vecs, tol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 6),
    data=st.data(),
)
def test_hypothesis_small(m: int, data) -> None:
    entries = data.draw(
        st.lists(
            st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
            min_size=m * m,
            max_size=m * m,
        )
    )
    x = torch.tensor(entries, dtype=F64).reshape(m, m)
    A = x + x.T
    vals, vecs = symmetric_eig(A)
    _check_decomposition(A, vals, vecs, tol=1e-12)


def test_batch_and_dtype() -> None:
    A = torch.stack([make_matrix(k, 5, seed=i) for i, k in enumerate(KINDS)])
    vals, vecs = symmetric_eig(A)
    for i in range(len(KINDS)):
        v_i, _ = symmetric_eig(A[i])
        torch.testing.assert_close(vals[i], v_i, rtol=0, atol=1e-12 * A[i].abs().max())
    vals32, vecs32 = symmetric_eig(A[1].float())
    assert vals32.dtype == vecs32.dtype == torch.float32
    torch.testing.assert_close(vals32, torch.linalg.eigvalsh(A[1]).float())


def test_zero_and_diagonal_matrices() -> None:
    vals, vecs = symmetric_eig(torch.zeros(4, 4, dtype=F64))
    assert bool((vals == 0).all())
    torch.testing.assert_close(vecs.abs().sum(0), torch.ones(4, dtype=F64))
    d = torch.tensor([3.0, -1.0, 2.0], dtype=F64)
    vals, _ = symmetric_eig(torch.diag(d))
    torch.testing.assert_close(vals, torch.sort(d).values, rtol=0, atol=0)


@pytest.mark.parametrize("n", [2, 4, 6, 8, 10, 16])
def test_round_robin_meets_every_pair_once_per_sweep(n: int) -> None:
    perm = _round_robin_permutation(n)
    slots = list(range(n))  # slots[i] = index (player) currently in slot i
    met = []
    for _ in range(n - 1):
        met += [frozenset((slots[2 * k], slots[2 * k + 1])) for k in range(n // 2)]
        slots = [slots[perm[i]] for i in range(n)]
    assert len(met) == len(set(met)) == n * (n - 1) // 2
    assert slots == list(range(n))  # a sweep returns every index to its slot


def test_default_sweeps() -> None:
    assert default_sweeps(1) == default_sweeps(2) == 1
    assert all(default_sweeps(m) >= 2 * math.ceil(math.log2(m)) + 4 for m in range(3, 300))


def test_fewer_sweeps_are_less_accurate() -> None:
    """The sweep count matters: one sweep is not enough for a 16 x 16 matrix."""
    A = make_matrix("random", 16)
    ref = torch.linalg.eigvalsh(A)
    vals, _ = symmetric_eig(A, n_sweeps=1)
    assert (vals - ref).abs().max() > 1e-6
    vals, _ = symmetric_eig(A, n_sweeps=default_sweeps(16))
    assert (vals - ref).abs().max() < 1e-12 * ref.abs().max()


def test_gradients_match_eigh() -> None:
    A = make_matrix("gram", 5, seed=7).requires_grad_()
    weights = torch.arange(1.0, 6.0, dtype=F64)
    probe = make_matrix("random", 5, seed=8)

    def loss(vals: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        # sign-invariant in the eigenvectors
        return (vals * weights).sum() + ((vecs * vals.sqrt()) @ vecs.mT * probe).sum()

    (grad,) = torch.autograd.grad(loss(*symmetric_eig(A)), A)
    (grad_ref,) = torch.autograd.grad(loss(*torch.linalg.eigh(A)), A)
    grad_ref = (grad_ref + grad_ref.mT) / 2  # symmetric_eig reads (A + A^T) / 2
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["gram", "rank_deficient"])
@pytest.mark.parametrize("m", [1, 3, 8, 20])
def test_psd_pinv_matches_torch(kind: str, m: int) -> None:
    G = make_matrix(kind, m, seed=m)
    b = torch.randn(m, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.pinv(G)
    scale = expected.abs().max()
    assert (psd_pinv(G) - expected).abs().max() <= 1e-8 * scale
    assert (psd_pinv_apply(G, b) - expected @ b).abs().max() <= 1e-8 * scale * b.abs().sum()
    B = torch.randn(m, 2, dtype=F64)
    assert (psd_pinv_apply(G, B) - expected @ B).abs().max() <= 1e-8 * scale * B.abs().sum()


def test_psd_pinv_tolerance_follows_input_dtype() -> None:
    """A float32 G drops eigenvalues below m * eps(float32) * max, as torch.linalg.pinv does, even
    though the computation runs in float64."""
    q = _orthogonal(3, torch.Generator().manual_seed(0))
    G = q @ torch.diag(torch.tensor([1.0, 1e-4, 1e-8], dtype=F64)) @ q.T  # 1e-8 < 3 * 1.2e-7
    G32 = G.float()
    eps32 = torch.finfo(torch.float32).eps
    expected = torch.linalg.pinv(G32.double(), rtol=3 * eps32)  # rank 2
    torch.testing.assert_close(psd_pinv(G32).double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.linalg.pinv(G32.double()).abs().max() > 1e7  # float64's tolerance keeps 1e-8
    assert psd_pinv(G).abs().max() > 1e7  # float64 keeps 1e-8
    torch.testing.assert_close(psd_pinv(G, rtol=1e-3), q[:, :1] @ q[:, :1].T, rtol=0, atol=1e-9)


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        symmetric_eig(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        symmetric_eig(torch.zeros(3))
    with pytest.raises(ValueError):
        symmetric_eig(torch.zeros(2, 2, dtype=torch.int64))


def test_compiles_fullgraph_without_recompiling() -> None:
    torch._dynamo.reset()
    A1, A2 = make_matrix("gram", 6, seed=1), make_matrix("rank_deficient", 6, seed=2)
    explanation = torch._dynamo.explain(symmetric_eig)(A1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(symmetric_eig, fullgraph=True)
    for A in (A1, A2):
        with torch._dynamo.config.patch(error_on_recompile=A is A2):
            vals, vecs = compiled(A)
        eager_vals, eager_vecs = symmetric_eig(A)
        torch.testing.assert_close(vals, eager_vals, rtol=1e-10, atol=1e-12)
        # (eigenvectors of the 4-dimensional null space of A2 are not unique: compare A itself)
        torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.mT, A, rtol=0, atol=1e-12)
        if A is A1:  # distinct eigenvalues: unique eigenvectors up to sign
            torch.testing.assert_close(vecs.abs(), eager_vecs.abs(), rtol=1e-8, atol=1e-10)
    torch._dynamo.reset()
