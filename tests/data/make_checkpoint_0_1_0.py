"""Generate ``checkpoint_0_1_0.pt``: a checkpoint in the state-dict format of jdoptim 0.1.0.

The file was made by running this script against jdoptim 0.1.0 (commit e2c95a6), whose
``JDOptimizer.state_dict()`` was ``{"optimizer": <inner state dict>, "weighting": <weighting
state dict>, "skipped_steps": int}``. Running it against a later version writes that version's
format instead, so do not regenerate the committed file;
``tests/optimizer/test_state_dict.py`` checks that it still loads.

The checkpoint holds the model and optimizer after 5 steps (Adam + STCH with a 3-step warm-up,
so the weighting's nadir is set) and the parameters after 3 more steps, as the reference for a
resumed run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import STCHWeighting

HERE = Path(__file__).resolve().parent


def build() -> tuple[nn.Module, JDOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, JDOptimizer(inner, STCHWeighting(warmup_steps=3))


def train(model: nn.Module, optimizer: JDOptimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)
        optimizer.zero_grad()
        optimizer.step(((model(x) - y) ** 2).mean(dim=0))


def main() -> None:
    model, optimizer = build()
    train(model, optimizer, range(5))
    # state_dict() returns references to live tensors (as torch's optimizers do): copy them.
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    train(model, optimizer, range(5, 8))
    checkpoint["params_after_8_steps"] = [p.detach().clone() for p in model.parameters()]
    torch.save(checkpoint, HERE / "checkpoint_0_1_0.pt")


if __name__ == "__main__":
    main()
