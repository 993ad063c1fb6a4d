r"""PCD's quadratic program, by a fixed number of Goldfarb–Idnani dual active-set steps."""

from __future__ import annotations

import torch
from torch import Tensor

from ._loop import fixed_loop


def pcd_dual_qp(
    gramian: Tensor, b: Tensor, dep_tol: float, atol: Tensor, n_steps: int
) -> tuple[Tensor, Tensor]:
    r"""Solve :math:`\min_{\mu \ge 0} \tfrac12 \mu^\top G \mu - b^\top \mu` by the dual
    active-set method of Goldfarb and Idnani, exactly as torchjd 0.18's PCD runs it, but with
    ``n_steps`` fixed steps and no host synchronisation. Returns :math:`\mu` and a boolean
    flag, ``True`` when the constraints are infeasible (see below).

    One step: if no constraint is pending, pick :math:`p = \arg\min_j \sigma_j` (first index)
    of the slacks :math:`\sigma = G\mu - b` off the active set :math:`A`, and stop for good if
    :math:`\sigma_p \ge -\text{atol}`. Then, with :math:`r = G_{AA}^{-1} G_{Ap}` and
    :math:`z = G_{pp} - G_{pA} r`, take the smaller of the *partial* step
    :math:`\min_{k \in A, r_k > 0} \mu_k / r_k` (ties: the earliest added :math:`k`) and the
    *full* step :math:`-\sigma_p / z` (only when :math:`z > \text{dep\_tol}\, G_{pp}`), update
    :math:`\mu_A \mathrel{-}= t r`, :math:`\mu_p \mathrel{+}= t`, and either add :math:`p` to
    :math:`A` (full step) or drop :math:`k` from it and keep :math:`p` pending. When both steps
    are infinite the problem is infeasible: the iterate is frozen and the flag is set.

    Data-dependent sizes are avoided by solving with :math:`G` on :math:`A \times A` and the
    identity elsewhere (:func:`torch.linalg.solve_ex`, no host check); the branches are
    ``torch.where`` selections.

    >>> import torch
    >>> G = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> mu, infeasible = pcd_dual_qp(G, torch.tensor([1.0, -1.0], dtype=torch.float64), 1e-9,
    ...                              torch.tensor(1e-9, dtype=torch.float64), 20)
    >>> mu, infeasible
    (tensor([0.5000, 0.0000], dtype=torch.float64), tensor(False))
    """
    n = gramian.shape[0]
    device = gramian.device
    dtype = gramian.dtype
    eye = torch.eye(n, dtype=dtype, device=device)
    index = torch.arange(n, device=device)
    inf = torch.tensor(torch.inf, dtype=dtype, device=device)

    def step(
        mu: Tensor,
        active: Tensor,
        stamps: Tensor,
        pending: Tensor,
        p: Tensor,
        sigma_p: Tensor,
        done: Tensor,
        infeasible: Tensor,
        counter: Tensor,
    ) -> tuple[Tensor, ...]:
        # Pick.
        sigma = torch.where(active, 0.0, gramian @ mu - b)
        picked = torch.argmin(sigma)
        need_pick = ~pending & ~done
        sigma_picked = sigma.gather(0, picked.unsqueeze(0)).squeeze(0)
        stop = need_pick & (sigma_picked >= -atol)
        done = done | stop
        p = torch.where(need_pick, picked, p)
        sigma_p = torch.where(need_pick, sigma_picked, sigma_p)
        run = ~done
        # Inner step with the pending constraint p.
        onehot_p = index == p
        p1 = p.unsqueeze(0)
        column = gramian.index_select(1, p1).squeeze(1)
        # The diagonal is read here: a view made outside the loop would alias G among its inputs.
        g_pp = gramian.diagonal().gather(0, p1).squeeze(0)
        both = active.unsqueeze(0) & active.unsqueeze(1)
        padded = torch.where(both, gramian, eye)
        r = torch.linalg.solve_ex(padded, torch.where(active, column, 0.0))[0]
        r = torch.where(active, r, 0.0)
        z = g_pp - column @ r
        positive = active & (r > 0)
        ratios = torch.where(positive, mu / torch.where(positive, r, 1.0), inf)
        partial = ratios.min()
        ties = positive & (ratios == partial)
        k = torch.argmin(torch.where(ties, stamps, torch.iinfo(torch.int64).max))
        independent = z > dep_tol * g_pp
        full = torch.where(independent, -sigma_p / torch.where(independent, z, 1.0), inf)
        t = torch.minimum(partial, full)
        blocked = torch.isinf(t)
        infeasible = infeasible | (run & blocked)
        move = run & ~blocked
        t = torch.where(move, t, 0.0)
        new_mu = mu - t * r + t * onehot_p.to(dtype)
        add = move & (full <= partial)
        drop = move & ~(full <= partial)
        onehot_k = index == k
        new_mu = torch.where(drop & onehot_k, 0.0, new_mu)
        mu = torch.where(move, new_mu, mu)
        active = torch.where(add & onehot_p, True, torch.where(drop & onehot_k, False, active))
        stamps = torch.where(add & onehot_p, counter, stamps)
        counter = counter + add.to(counter.dtype)
        sigma_p = torch.where(drop, column @ mu - b.gather(0, p1).squeeze(0), sigma_p)
        pending = torch.where(add, False, torch.where(drop, True, pending | need_pick))
        done = done | infeasible
        return mu, active, stamps, pending, p, sigma_p, done, infeasible, counter

    def false() -> Tensor:  # distinct tensors: while_loop's carries must not alias
        return torch.zeros((), dtype=torch.bool, device=device)

    def zero() -> Tensor:
        return torch.zeros((), dtype=torch.int64, device=device)

    init = (
        torch.zeros(n, dtype=dtype, device=device),
        torch.zeros(n, dtype=torch.bool, device=device),
        torch.zeros(n, dtype=torch.int64, device=device),
        false(),
        zero(),
        torch.zeros((), dtype=dtype, device=device),
        false(),
        false(),
        zero(),
    )
    mu, _, _, _, _, _, _, infeasible, _ = fixed_loop(n_steps, step, init)
    return mu, infeasible
