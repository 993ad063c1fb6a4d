"""Hugging Face Accelerate, with gradient accumulation.

``accelerator.prepare`` wraps the ``JDOptimizer`` in an ``AcceleratedOptimizer``, whose
``step()`` takes no losses and does nothing on the micro-batches of a gradient accumulation.
So the JD gradient is written by :func:`jdoptim.integrations.accelerate_backward` (in place of
``accelerator.backward(loss)``: it divides the losses by the accumulation steps, scales them
when there is a loss scaler, and calls ``JDOptimizer.backward``), once per micro-batch inside
``accelerator.accumulate(model)``. The prepared optimizer and scheduler then step as for any
optimizer, and ``accelerator.save_state`` / ``load_state`` save the JD state with the rest.

The run matches a plain loop that does the same accumulation by hand. (The file is not
called ``accelerate.py``: run as a script, it would shadow the ``accelerate`` package.)
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting
from jdoptim.integrations import accelerate_backward

try:
    from accelerate import Accelerator
except ImportError:  # pragma: no cover - accelerate is optional (pip install accelerate)
    Accelerator = None


def build() -> tuple[nn.Module, JDOptimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), UPGradWeighting())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def main(epochs: int = 3, n_samples: int = 256, accumulation: int = 2) -> None:
    if Accelerator is None:
        print("accelerate is not installed: pip install accelerate")
        return

    torch.manual_seed(0)
    x = torch.randn(n_samples, 8)
    y = torch.stack([x[:, 0], -x[:, 1], x[:, 2] * x[:, 3]], dim=1)
    dataset = torch.utils.data.TensorDataset(x, y)

    def losses_of(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return ((model(xb) - yb) ** 2).mean(dim=0)  # three losses

    # With Accelerate.
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, optimizer, scheduler = build()
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    with torch.no_grad():
        before = ((model(x) - y) ** 2).mean()
    for _ in range(epochs):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerate_backward(accelerator, optimizer, losses_of(model, xb, yb))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()  # skipped by Accelerate until the last micro-batch
                scheduler.step()
                optimizer.zero_grad()

    # The same accumulation by hand.
    ref_model, ref_optimizer, ref_scheduler = build()
    for _ in range(epochs):
        for i, (xb, yb) in enumerate(torch.utils.data.DataLoader(dataset, batch_size=16)):
            ref_optimizer.backward(losses_of(ref_model, xb, yb) / accumulation)
            if (i + 1) % accumulation == 0:
                torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
                ref_optimizer.step()
                ref_scheduler.step()
                ref_optimizer.zero_grad()

    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with torch.no_grad():
        after = ((model(x) - y) ** 2).mean()
    print(f"mean loss: {before:.3f} -> {after:.3f}; Accelerate matches the plain loop")
    assert after < before


if __name__ == "__main__":
    main()
