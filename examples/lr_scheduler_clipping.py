"""LR schedulers and gradient clipping work on a ``JDOptimizer`` as on the optimizer it wraps.

``param_groups`` and ``state`` *are* the inner optimizer's, so a scheduler built on the
``JDOptimizer`` changes the inner learning rate. For clipping, split the step in two:
:meth:`~jdoptim.JDOptimizer.backward` writes the JD direction into ``.grad``, clip it, then
call :meth:`~jdoptim.JDOptimizer.step` with no losses.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def main(steps: int = 20) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    optimizer = JDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), UPGradWeighting())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    x, y = torch.randn(64, 8), torch.randn(64, 2)
    max_norm = 0.5
    for _ in range(steps):
        losses = ((model(x) - y) ** 2).mean(dim=0)
        optimizer.zero_grad()
        optimizer.backward(losses)  # .grad = J^T w
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        clipped = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
        )
        assert clipped <= max_norm * (1 + 1e-5)
        optimizer.step()  # the inner AdamW step on the clipped gradient
        scheduler.step()

    lr = optimizer.optimizer.param_groups[0]["lr"]  # the inner optimizer's learning rate
    print(f"last gradient norm before clipping: {norm:.3f}; final lr: {lr:.2e}")
    assert lr < 1e-4  # the cosine schedule reached (almost) zero


if __name__ == "__main__":
    main()
