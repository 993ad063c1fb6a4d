"""Basic usage: wrap any torch optimizer and give ``step`` a vector of losses.

A small regression model with three outputs is trained on three losses (one per output) with
Jacobian descent: at each step :class:`jdoptim.JDOptimizer` computes the Gramian of the three
gradients, turns it into three weights with UPGrad, writes the combined gradient into ``.grad``
and calls ``SGD.step()``.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def main(steps: int = 50) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), UPGradWeighting())

    x = torch.randn(64, 10)
    y = x[:, :3] * torch.tensor([1.0, -2.0, 0.5])  # three targets: three objectives

    history = []
    for _ in range(steps):
        losses = ((model(x) - y) ** 2).mean(dim=0)  # shape [3]: one loss per output
        optimizer.zero_grad()
        weights = optimizer.step(losses)  # Gramian -> UPGrad weights -> .grad -> SGD step
        history.append(losses.sum().item())

    print(f"total loss: {history[0]:.3f} -> {history[-1]:.3f}; last weights: {weights}")
    assert history[-1] < 0.5 * history[0]
    return history


if __name__ == "__main__":
    main()
