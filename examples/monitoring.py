"""Monitoring: the weights, the Gramian, and the conflicts between objectives.

After each step ``optimizer.last_weights`` holds the weights ``w`` and
``optimizer.last_gramian`` the Gramian ``G`` of the step (both detached). From them:

* the cosine similarity of the gradients of objectives ``i`` and ``j`` is
  ``G[i, j] / sqrt(G[i, i] G[j, j])``; a negative value is a conflict between the two;
* ``(G @ w)[i]`` is the inner product of the update with the gradient of objective ``i``: a
  negative value means the update increases that objective (to first order). UPGrad keeps it
  non-negative up to its ridge: ``(G @ w)[i] >= -reg_eps * trace(G) * w[i]``, while the plain
  mean of the gradients has no such guarantee.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def conflict_stats(gramian: torch.Tensor, weights: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Number of conflicting pairs of objectives, and ``G @ w`` (one entry per objective)."""
    norms = gramian.diagonal().clamp_min(1e-12).sqrt()
    cosine = gramian / (norms[:, None] * norms[None, :])
    pairs = int((cosine.triu(diagonal=1) < 0).sum())
    return pairs, gramian @ weights.to(gramian.dtype)


def main(steps: int = 10) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))
    weighting = UPGradWeighting()
    optimizer = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), weighting)
    x = torch.randn(64, 10)
    t, s = x[:, 0], x[:, 1] * x[:, 2]

    def objectives() -> torch.Tensor:
        out = model(x)
        return torch.stack(
            [  # the first two pull output 0 in opposite directions: they conflict
                ((out[:, 0] - t) ** 2).mean(),
                3 * ((out[:, 0] + t - 0.5) ** 2).mean(),
                ((out[:, 1] - s) ** 2).mean(),
            ]
        )

    for step in range(steps):
        losses = objectives()
        optimizer.zero_grad()
        optimizer.step(losses)

        G, w = optimizer.last_gramian, optimizer.last_weights
        pairs, alignment = conflict_stats(G, w)
        mean = torch.full_like(w, 1 / len(w))
        _, mean_alignment = conflict_stats(G, mean)
        print(
            f"step {step}: weights {[round(v, 3) for v in w.tolist()]}, "
            f"{pairs} conflicting pairs, min <g_i, d>: UPGrad {alignment.min():+.2e}, "
            f"mean {mean_alignment.min():+.2e}"
        )
        slack = weighting.reg_eps * G.trace() * w.to(G.dtype) + 1e-6 * G.abs().max()
        assert bool((alignment >= -slack).all())  # UPGrad: no objective gets worse


if __name__ == "__main__":
    main()
