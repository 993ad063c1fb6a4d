r"""A sync-free symmetric eigensolver of fixed cost, and PSD pseudo-inverses built on it.

``torch.linalg.eigh``, ``pinv`` and ``svd`` synchronise the host on CUDA and do not compile to a
fixed-cost graph. This module replaces them for the small :math:`m \times m` matrices of Jacobian
descent with the **parallel cyclic Jacobi method**.

Each *round* applies :math:`h = \lceil m/2 \rceil` disjoint plane rotations at once: the pairs of
positions :math:`(2k, 2k+1)`. For a pair with entries :math:`a = A_{pp}`, :math:`b = A_{qq}`,
:math:`c = A_{pq}`, the rotation angle zeroes :math:`c`:

.. math::

    \tau = \frac{b - a}{2c}, \qquad
    t = \frac{\operatorname{sign}(\tau)}{|\tau| + \sqrt{1 + \tau^2}}, \qquad
    \cos\theta = \frac{1}{\sqrt{1 + t^2}}, \qquad \sin\theta = t \cos\theta,

(:math:`t = 0` when :math:`c = 0`) and :math:`A \leftarrow R^\top A R`. After the rotations, a
fixed permutation moves the rows and columns as in a round-robin tournament (the *circle
method*: slot 0 stays, the others rotate), so that every pair of indices meets exactly once in
the :math:`m' - 1` rounds of a *sweep* (:math:`m'` is :math:`m` rounded up to even; an odd
:math:`m` gets an isolated zero row in the fixed slot, which no rotation touches). The
accumulated rotations give the eigenvectors, the diagonal the eigenvalues. Cyclic Jacobi
converges quadratically: the number of sweeps is fixed from :math:`m`
(:func:`default_sweeps`), so the cost is a fixed
:math:`O(\text{sweeps} \cdot m^3)` with no data-dependent control flow. The rounds run in
:func:`~jdoptim.solvers._loop.fixed_loop` (one ``while_loop`` under ``torch.compile``).

**Where it runs.** On the CPU there is no host to synchronise with, so by default
(``method="auto"``) :func:`symmetric_eig` calls LAPACK through ``torch.linalg.eigh`` there
(exact and ~100x faster than Jacobi at m = 256) and uses Jacobi on every other device. Force
either with ``method=`` or, globally, :func:`eig_method` (the tests run the weightings with both).

Everything is computed in float64 (the input is cast; results are cast back). Gradients, when
the input requires them, are attached with the first-order perturbation formulas of a symmetric
eigendecomposition (see :func:`symmetric_eig`) rather than by differentiating the iterations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._eager_compile import eager_compiled
from ._loop import fixed_loop

__all__ = ["default_sweeps", "eig_method", "psd_pinv", "psd_pinv_apply", "symmetric_eig"]

EigMethod = Literal["auto", "jacobi", "eigh"]
_default_method: EigMethod = "auto"


@contextmanager
def eig_method(method: EigMethod) -> Iterator[None]:
    """Make ``method`` the default of :func:`symmetric_eig` inside the ``with`` block.

    >>> with eig_method("jacobi"):
    ...     pass
    """
    global _default_method
    if method not in ("auto", "jacobi", "eigh"):
        raise ValueError(f"method must be 'auto', 'jacobi' or 'eigh', but got {method!r}.")
    previous, _default_method = _default_method, method
    try:
        yield
    finally:
        _default_method = previous


SKIP = 2.0**-52


def default_sweeps(m: int) -> int:
    r"""Number of Jacobi sweeps used for an ``m x m`` matrix: 1 for :math:`m \le 2` (one rotation
    diagonalises a 2 x 2 matrix), else :math:`2 \lceil \log_2 m \rceil + 4`.

    Measured (float64): random, Gram and rank-deficient matrices reach an off-diagonal norm
    below :math:`10^{-13} \|A\|` in about :math:`\lceil \log_2 m \rceil + 3` sweeps. Matrices
    with close but distinct eigenvalues (clusters of width :math:`10^{-9}`, or eigenvalues spread
    evenly over 10 decades) converge only linearly until the off-diagonal norm falls below the
    eigenvalue gaps, and need about twice as many; the default covers them (see
    ``tests/solvers/test_eigh.py``).

    >>> default_sweeps(2), default_sweeps(8), default_sweeps(256)
    (1, 10, 20)
    """
    if m <= 2:
        return 1
    return 2 * math.ceil(math.log2(m)) + 4


def _round_robin_permutation(n: int) -> tuple[int, ...]:
    """Gather indices moving rows/columns to the next round of the circle method.

    Players sit in a list ``L`` of even length ``n``; round pairs are ``(L[k], L[n-1-k])``. The
    next round keeps ``L[0]`` and rotates the rest by one. List position ``i`` lives in slot
    ``2i`` (``i < n/2``) or ``2(n-1-i) + 1``, so the pairs are the slots ``(2k, 2k+1)``.
    """
    h = n // 2

    def slot(i: int) -> int:
        return 2 * i if i < h else 2 * (n - 1 - i) + 1

    perm = [0] * n
    for i in range(n):
        nxt = 0 if i == 0 else (i % (n - 1)) + 1
        perm[slot(nxt)] = slot(i)
    return tuple(perm)


class _Schedule(NamedTuple):
    """Static index vectors of one round (see :func:`_schedule`)."""

    src: Tensor  # output slot i reads slot src[i] of the rotated matrix
    partner: Tensor  # ... and its rotation partner src[i] ^ 1
    pair: Tensor  # the pair (rotation) index src[i] // 2
    sign: Tensor  # -1 if src[i] is the first of its pair, +1 otherwise


def _schedule(n: int, device: torch.device) -> _Schedule:
    src = torch.tensor(_round_robin_permutation(n), dtype=torch.int64, device=device)
    sign = torch.where(src % 2 == 0, -1.0, 1.0).to(torch.float64)
    return _Schedule(src, src ^ 1, src // 2, sign)


def _mix(x: Tensor, alpha: Tensor, beta: Tensor, sched: _Schedule, dim: int) -> Tensor:
    """Along ``dim`` (-2: rows, -1: columns), entry ``i`` becomes
    ``alpha_i x[src_i] + beta_i x[partner_i]``."""
    axis = -1 if dim == -2 else -2
    head = alpha.unsqueeze(axis) * x.index_select(dim, sched.src)
    return head + beta.unsqueeze(axis) * x.index_select(dim, sched.partner)


def _jacobi_round(a: Tensor, w: Tensor, sched: _Schedule, skip: Tensor) -> tuple[Tensor, Tensor]:
    """One parallel round: ``a <- P R^T a R P^T`` and ``w <- P R^T w`` (rows of ``w`` are the
    current eigenvector estimates). Rotations with ``|a_pq| <= skip`` are skipped.

    Row ``i`` of ``P R^T x`` is ``alpha_i x[src_i] + beta_i x[partner_i]``: every update is a
    pointwise expression of gathers, which ``torch.compile`` fuses into one kernel.
    """
    *batch, n, _ = a.shape
    h = n // 2
    blocks = a.reshape(*batch, h, 2, h, 2).diagonal(dim1=-4, dim2=-2)  # [..., 2, 2, h]
    apq = blocks[..., 0, 1, :]
    diff = blocks[..., 1, 1, :] - blocks[..., 0, 0, :]
    # theta = atan(2 a_pq / (a_qq - a_pp)) / 2, the inner rotation |theta| <= pi/4 (0 for 0/0).
    theta = 0.5 * torch.atan2(torch.where(diff < 0, -2 * apq, 2 * apq), diff.abs())
    theta = torch.where(apq.abs() > skip, theta, 0.0)
    # R_k = [[c, s], [-s, c]]; rows (p, q) <- R_k^T (p, q) = [[c, -s], [s, c]] (p, q).
    theta = theta.index_select(-1, sched.pair)
    alpha, beta = torch.cos(theta), torch.sin(theta) * sched.sign
    a = _mix(_mix(a, alpha, beta, sched, -2), alpha, beta, sched, -1)
    w = _mix(w, alpha, beta, sched, -2)
    return a, w


@eager_compiled
def _jacobi(a: Tensor, n_sweeps: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (unsorted) and eigenvector rows of the float64 symmetric matrix ``a``."""
    *batch, m, _ = a.shape
    n = m + (m % 2)
    if n != m:  # pad with an isolated zero row/column in the fixed slot 0
        a = torch.nn.functional.pad(a, (1, 0, 1, 0))
    sched = _schedule(n, a.device)
    w = torch.eye(n, dtype=a.dtype, device=a.device).expand(*batch, n, n).contiguous()
    skip = SKIP * torch.linalg.matrix_norm(a).unsqueeze(-1)
    a, w = fixed_loop(n_sweeps * (n - 1), lambda a_, w_: _jacobi_round(a_, w_, sched, skip), (a, w))
    eigenvalues = a.diagonal(dim1=-2, dim2=-1)
    if n != m:
        eigenvalues, w = eigenvalues[..., 1:], w[..., 1:, 1:]
    return eigenvalues, w


def symmetric_eig(
    A: Tensor, *, n_sweeps: int | None = None, method: EigMethod | None = None
) -> tuple[Tensor, Tensor]:
    r"""Eigendecomposition :math:`A = V \operatorname{diag}(\lambda) V^\top` of a symmetric
    matrix (or batch of matrices, shape ``[..., m, m]``), without host synchronisation.

    A sync-free, fixed-cost replacement for :func:`torch.linalg.eigh`: parallel cyclic Jacobi
    (see the module docstring) in float64, ``n_sweeps`` sweeps (default
    :func:`default_sweeps`). Only the symmetric part :math:`(A + A^\top)/2` is read.

    Args:
        A: symmetric matrix or batch, shape ``[..., m, m]``, floating point.
        n_sweeps: number of Jacobi sweeps; ``None`` picks :func:`default_sweeps` ``(m)``.
        method: ``"jacobi"``, ``"eigh"`` (LAPACK/cuSOLVER: synchronises on CUDA) or ``"auto"``
            (``"eigh"`` on the CPU, ``"jacobi"`` elsewhere); ``None``: the :func:`eig_method`
            default (``"auto"``).

    Returns:
        ``(eigenvalues, eigenvectors)``: eigenvalues in ascending order, shape ``[..., m]``,
        and the orthonormal eigenvectors as columns, shape ``[..., m, m]``, both in ``A``'s
        dtype. Eigenvector signs (and bases of repeated eigenvalues) are arbitrary.

    Gradients are those of ``torch.linalg.eigh``: with :math:`M = V^\top \dot A V`,
    :math:`\dot\lambda = \operatorname{diag}(M)` and :math:`\dot V = V (F \circ M)` with
    :math:`F_{ij} = 1/(\lambda_j - \lambda_i)` for :math:`i \ne j`. Where two eigenvalues are
    equal to within :math:`10^{-12}\max|\lambda|`, :math:`F_{ij}` is set to 0 (``eigh`` gives
    inf/NaN there), so gradients of functions of degenerate eigenvectors are not exact.

    >>> import torch
    >>> vals, vecs = symmetric_eig(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    >>> vals
    tensor([1., 3.])
    >>> torch.allclose(vecs @ torch.diag(vals) @ vecs.T, torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    True
    """
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"Expected a square matrix or batch of them. Found shape {A.shape}.")
    if not A.is_floating_point():
        raise ValueError(f"Expected a floating-point matrix. Found dtype {A.dtype}.")
    m = A.shape[-1]
    if m == 0:
        return A.new_zeros(A.shape[:-1]), A.new_zeros(A.shape)
    method = _default_method if method is None else method
    if method == "auto":
        method = "eigh" if A.device.type == "cpu" else "jacobi"
    with torch.no_grad():
        a = A.detach().to(torch.float64)
        a = (a + a.mT) / 2
        if method == "eigh":
            eigenvalues, eigenvectors = torch.linalg.eigh(a)  # CPU: no host to sync with
        elif method == "jacobi":
            sweeps = default_sweeps(m) if n_sweeps is None else n_sweeps
            diag, rows = _jacobi(a, sweeps)
            eigenvalues, order = torch.sort(diag, dim=-1)
            eigenvectors = rows.gather(-2, order.unsqueeze(-1).expand_as(rows)).mT
        else:
            raise ValueError(f"method must be 'auto', 'jacobi' or 'eigh', but got {method!r}.")
    if A.requires_grad and torch.is_grad_enabled():
        eigenvalues, eigenvectors = _attach_gradients(A, eigenvalues, eigenvectors)
    return eigenvalues.to(A.dtype), eigenvectors.to(A.dtype)


def _attach_gradients(A: Tensor, vals: Tensor, vecs: Tensor) -> tuple[Tensor, Tensor]:
    """Add first-order terms that are zero in value and carry ``eigh``'s derivatives."""
    a = A.to(torch.float64)
    delta = a - a.detach()
    delta = (delta + delta.mT) / 2
    M = vecs.mT @ delta @ vecs
    gaps = vals.unsqueeze(-2) - vals.unsqueeze(-1)  # [i, j] = lambda_j - lambda_i
    scale = vals.abs().amax(-1, keepdim=True).unsqueeze(-1)
    far = gaps.abs() > 1e-12 * scale
    F = torch.where(far, 1 / torch.where(far, gaps, torch.ones_like(gaps)), torch.zeros_like(gaps))
    return vals + M.diagonal(dim1=-2, dim2=-1), vecs + vecs @ (F * M)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _pinv_factors(G: Tensor, rtol: float | None, n_sweeps: int | None) -> tuple[Tensor, Tensor]:
    """Eigenvectors ``V`` (float64) and the pseudo-inverted eigenvalues of ``G``."""
    m = G.shape[-1]
    rel = m * _eps(G.dtype) if rtol is None else rtol
    vals, vecs = symmetric_eig(G.to(torch.float64), n_sweeps=n_sweeps)
    sing = vals.abs()
    keep = sing > rel * sing.amax(-1, keepdim=True)
    inv = torch.where(keep, 1 / torch.where(keep, vals, torch.ones_like(vals)), 0.0)
    return vecs, inv


def psd_pinv_apply(
    G: Tensor, b: Tensor, rtol: float | None = None, *, n_sweeps: int | None = None
) -> Tensor:
    r"""Return :math:`G^+ b` for a symmetric (PSD) matrix :math:`G`, without host sync.

    With :math:`G = V \operatorname{diag}(\lambda) V^\top` (:func:`symmetric_eig`, float64),
    :math:`G^+ = V \operatorname{diag}(\lambda^+) V^\top` where :math:`\lambda_i^+ = 1/\lambda_i`
    if :math:`|\lambda_i| > \text{rtol} \cdot \max_j |\lambda_j|` and 0 otherwise. The default
    ``rtol`` is that of :func:`torch.linalg.pinv`: :math:`m \cdot \varepsilon`, with
    :math:`\varepsilon` the machine epsilon of ``G``'s dtype (float32's for a float32 ``G``,
    although the computation runs in float64).

    Args:
        G: symmetric matrix, shape ``[..., m, m]``.
        b: right-hand side, shape ``[..., m]`` (a vector) or ``[..., m, k]``.
        rtol: relative tolerance on the singular values :math:`|\lambda_i|`.
        n_sweeps: Jacobi sweeps (see :func:`symmetric_eig`).

    Returns:
        :math:`G^+ b` in the promoted dtype of ``G`` and ``b``.

    >>> import torch
    >>> psd_pinv_apply(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([2.0, 2.0]))
    tensor([1., 1.])
    """
    vecs, inv = _pinv_factors(G, rtol, n_sweeps)
    is_vector = b.ndim == G.ndim - 1
    rhs = b.to(torch.float64)
    rhs = rhs.unsqueeze(-1) if is_vector else rhs
    out = vecs @ (inv.unsqueeze(-1) * (vecs.mT @ rhs))
    out = out.squeeze(-1) if is_vector else out
    return out.to(torch.promote_types(G.dtype, b.dtype))


def psd_pinv(G: Tensor, rtol: float | None = None, *, n_sweeps: int | None = None) -> Tensor:
    r"""Return the pseudo-inverse :math:`G^+` of a symmetric (PSD) matrix; see
    :func:`psd_pinv_apply` for the tolerance, which matches :func:`torch.linalg.pinv`'s default.

    >>> import torch
    >>> psd_pinv(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    tensor([[0.5000, 0.0000],
            [0.0000, 0.0000]])
    """
    vecs, inv = _pinv_factors(G, rtol, n_sweeps)
    return ((vecs * inv.unsqueeze(-2)) @ vecs.mT).to(G.dtype)
