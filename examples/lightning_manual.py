"""PyTorch Lightning with manual optimisation.

Lightning's automatic optimisation calls ``backward`` on one scalar loss, which is not what
Jacobian descent needs. With ``automatic_optimization = False`` the ``training_step`` computes
the vector of losses, asks the ``JDOptimizer`` for the JD gradient
(:meth:`~jdoptim.JDOptimizer.backward`) and steps through Lightning's optimizer wrapper
(``self.optimizers()``), so Lightning's hooks, checkpointing and loggers keep working.

Needs ``pip install lightning``; the test suite skips this example when it is not installed.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting

try:
    import lightning as L
except ImportError:  # pragma: no cover - lightning is optional
    L = None


def main(max_epochs: int = 3) -> None:
    if L is None:
        print("lightning is not installed: pip install lightning")
        return

    class MultiOutputRegression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False  # we call backward/step ourselves
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

        def configure_optimizers(self) -> JDOptimizer:
            self.jd = JDOptimizer(torch.optim.Adam(self.parameters(), lr=1e-2), UPGradWeighting())
            return self.jd

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
            x, y = batch
            losses = ((self.net(x) - y) ** 2).mean(dim=0)  # three losses
            optimizer = self.optimizers()  # Lightning's wrapper around self.jd
            optimizer.zero_grad()
            self.jd.backward(losses)  # JD gradient into .grad
            optimizer.step()  # the inner Adam step, with Lightning's hooks
            self.log("loss", losses.sum(), prog_bar=True)
            return losses.sum().detach()

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.stack([x[:, 0], -x[:, 1], x[:, 2] * x[:, 3]], dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    model = MultiOutputRegression()
    with torch.no_grad():
        before = ((model.net(x) - y) ** 2).mean()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    with torch.no_grad():
        after = ((model.net(x) - y) ** 2).mean()
    print(f"mean loss: {before:.3f} -> {after:.3f}")
    assert after < before


if __name__ == "__main__":
    main()
