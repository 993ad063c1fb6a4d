"""Instance-wise risk minimisation (IWRM): one objective per training sample.

The losses are not averaged: ``reduction="none"`` keeps one loss per sample, and Jacobian
descent treats each as an objective. Passing ``model=`` and ``batch_dim=0`` declares that loss
``b`` depends on sample ``b`` only, so ``engine="auto"`` picks the
:class:`~jdoptim.gramian.LayerwiseGramianEngine`: the ``[B, B]`` Gramian of the per-sample
gradients is built from each layer's inputs and output gradients, without ever materialising
the per-sample gradients.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting
from jdoptim.gramian import LayerwiseGramianEngine


def main(steps: int = 40, batch_size: int = 16) -> float:
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x[:, :5].sum(dim=1) > 0).long()  # a binary classification task
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGradWeighting(),
        model=model,
        batch_dim=0,
    )
    assert isinstance(optimizer.engine, LayerwiseGramianEngine)

    for step in range(steps):
        idx = torch.arange(step * batch_size, (step + 1) * batch_size) % len(x)
        losses = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")  # [B]
        optimizer.zero_grad()
        optimizer.step(losses)

    assert optimizer.last_gramian.shape == (batch_size, batch_size)
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"training accuracy after {steps} IWRM steps: {accuracy:.2f}")
    assert accuracy > 0.8
    return accuracy


if __name__ == "__main__":
    main()
