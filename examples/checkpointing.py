"""Checkpoint and resume.

``JDOptimizer.state_dict()`` is the inner optimizer's state dict (``state``, e.g. Adam's
moments, and ``param_groups``) plus one extra key, ``"jdoptim"``: the weighting's state
(buffers of stateful weightings) and the step counters. Save it with the model's state dict;
after ``load_state_dict`` on a freshly built model and optimizer, training continues exactly as
if it had never stopped.
"""

import io

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def build() -> tuple[nn.Module, JDOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), UPGradWeighting())
    return model, optimizer


def train(model: nn.Module, optimizer: JDOptimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)  # batch `step`, whoever trains on it
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
        optimizer.zero_grad()
        optimizer.step(((model(x) - y) ** 2).mean(dim=0))


def main() -> None:
    # Reference: 10 steps in one go.
    ref_model, ref_optimizer = build()
    train(ref_model, ref_optimizer, range(10))

    # 5 steps, checkpoint (here to memory; a file path works the same) ...
    model, optimizer = build()
    train(model, optimizer, range(5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    assert {"state", "param_groups", "jdoptim"} <= set(optimizer.state_dict())

    # ... then resume in a fresh process: rebuild, load, continue.
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, optimizer = build()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, range(5, 10))

    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    print("resumed training matches uninterrupted training exactly")


if __name__ == "__main__":
    main()
