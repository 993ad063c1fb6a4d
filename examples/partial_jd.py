"""Partial Jacobian descent: JD on a subset of the parameters (``params=``).

Only the shared trunk takes part in the Jacobian; the task-specific heads get an ordinary
gradient. With ``other_params_grad="sum"`` each head gets the gradient of the sum of the
losses (each head only sees its own task's loss: the convention of torchjd's
``mtl_backward``); the default ``"weighted"`` gives them the gradient of :math:`w^\\top L`.
The Gramian is then only ``[K, K]`` over the trunk's parameters, which is cheaper and keeps the
heads' updates untouched by the aggregation.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def main(steps: int = 60) -> torch.Tensor:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(3)])
    inner = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-2)
    optimizer = JDOptimizer(
        inner, UPGradWeighting(), params=trunk.parameters(), other_params_grad="sum"
    )

    x = torch.randn(128, 8)
    targets = torch.stack([x[:, 0], x[:, 1] - x[:, 0], x[:, 2].abs()], dim=1)

    def task_losses() -> torch.Tensor:
        features = trunk(x)
        preds = torch.cat([head(features) for head in heads], dim=1)
        return ((preds - targets) ** 2).mean(dim=0)  # [3]

    first = task_losses().detach()
    for _ in range(steps):
        losses = task_losses()
        optimizer.zero_grad()
        optimizer.step(losses)

    # The heads got the plain gradient of their own loss (what "sum" means for task heads):
    optimizer.zero_grad()
    losses = task_losses()
    optimizer.backward(losses, retain_graph=True)
    head_grad = heads[0].weight.grad.clone()
    expected = torch.autograd.grad(losses[0], heads[0].weight)[0]
    torch.testing.assert_close(head_grad, expected)

    final = task_losses().detach()
    print(f"task losses: {first.tolist()} -> {final.tolist()}")
    assert bool((final < first).all())
    return final


if __name__ == "__main__":
    main()
