"""Mixed precision: ``torch.autocast`` (bfloat16 on the CPU) and ``GradScaler`` semantics.

Under autocast the forward pass runs in bfloat16; jdoptim accumulates the Gramian in float32
(or wider) and writes float32 gradients into the float32 parameters.

With a ``GradScaler`` the *losses* are scaled (``scaler.scale(losses)``) and handed to
:meth:`~jdoptim.JDOptimizer.backward`; ``scaler.step(optimizer)`` then unscales the gradients,
skips the step if they hold inf/NaN and calls ``optimizer.step()``. Use
``nonfinite="propagate"`` so that an overflow reaches the scaler (which detects it itself)
instead of raising. Scaling all losses by ``s`` scales the Gramian by ``s**2``; UPGrad
normalises the Gramian by its trace, so its weights do not change and the scaled update
unscales exactly.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def main(steps: int = 30) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), UPGradWeighting(), nonfinite="propagate"
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # on CUDA: GradScaler("cuda")

    x = torch.randn(64, 16)
    y = torch.randn(64, 3)

    first = None
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(x)  # the linear layers run in bfloat16
            losses = ((pred - y) ** 2).mean(dim=0)
        first = losses.detach().float() if first is None else first
        optimizer.zero_grad()
        optimizer.backward(scaler.scale(losses))  # JD on the scaled losses
        scaler.step(optimizer)  # unscale, skip on inf/NaN, optimizer.step()
        scaler.update()

    assert pred.dtype == torch.bfloat16
    assert optimizer.last_gramian.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    print(f"losses: {first.tolist()} -> {losses.detach().float().tolist()}")
    assert bool((losses.detach().float() < first).all())

    # An overflow: the gradients are inf, the scaler skips the step and halves its scale.
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = ((model(x) - y) ** 2).mean(dim=0) * float("inf")
    optimizer.zero_grad()
    optimizer.backward(scaler.scale(losses))
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    print(f"overflow: step skipped, scale {scale} -> {scaler.get_scale()}")


if __name__ == "__main__":
    main()
