"""Multi-task learning: a shared trunk, one head per task, one loss per task.

Two regression tasks share a trunk. Their gradients with respect to the trunk conflict (the
second target is almost the opposite of the first), so the gradient of the summed loss would
sacrifice one task for the other. UPGrad combines the task gradients into an update that
conflicts with neither: the Gramian ``G`` and the weights ``w`` satisfy ``G @ w >= 0``.

The :class:`~jdoptim.gramian.MultiTaskGramianEngine`, built on the trunk and the heads (in the
order of the losses), computes the same Gramian as the default Jacobian engine while keeping
the structure: one ordinary backward through the heads and one backward through the trunk
batched over the tasks.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting
from jdoptim.gramian import MultiTaskGramianEngine


class MultiTaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(x)
        return [head(features).squeeze(-1) for head in self.heads]


def main(steps: int = 60) -> torch.Tensor:
    torch.manual_seed(0)
    model = MultiTaskModel()
    engine = MultiTaskGramianEngine(model.trunk, model.heads)
    optimizer = JDOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), UPGradWeighting(), engine=engine
    )

    x = torch.randn(128, 8)
    targets = [x[:, 0] + x[:, 1] ** 2, -x[:, 0] + 0.1 * x[:, 2]]

    first = None
    for _ in range(steps):
        outputs = model(x)
        losses = torch.stack(
            [nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True)]
        )
        if first is None:
            first = losses.detach()
        optimizer.zero_grad()
        optimizer.step(losses)
        # The update conflicts with no task (up to the solver's tolerance):
        gramian, weights = optimizer.last_gramian, optimizer.last_weights
        assert bool((gramian @ weights.to(gramian.dtype) >= -1e-4 * gramian.trace()).all())

    print(f"task losses: {first.tolist()} -> {losses.detach().tolist()}")
    assert bool((losses.detach() < first).all())  # every task improved
    return losses.detach()


if __name__ == "__main__":
    main()
