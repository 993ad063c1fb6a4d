"""PyTorch Lightning with manual optimisation, checkpointing and resuming.

Lightning's automatic optimisation calls ``backward`` on one scalar loss, which is not what
Jacobian descent needs. With ``automatic_optimization = False`` the ``training_step`` computes
the vector of losses, asks the ``JDOptimizer`` for the JD gradient
(:meth:`~jdoptim.JDOptimizer.backward`) and steps through Lightning's optimizer wrapper
(``self.optimizers()``), so Lightning's hooks, checkpointing and loggers keep working.

``JDOptimizer.state_dict()`` has the standard layout (the inner optimizer's ``state`` and
``param_groups``, plus the JD extras under ``"jdoptim"``), so Lightning saves it in the
checkpoint's ``optimizer_states`` and restores it with ``trainer.fit(..., ckpt_path=...)``:
the resumed run ends exactly where an uninterrupted one does.
"""

import tempfile
from pathlib import Path

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting

try:
    import lightning as L
except ImportError:  # pragma: no cover - lightning is optional (pip install lightning)
    L = None


def main(max_epochs: int = 3, n_samples: int = 256) -> None:
    if L is None:
        print("lightning is not installed: pip install lightning")
        return

    class MultiOutputRegression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False  # we call backward/step ourselves
            torch.manual_seed(0)
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
    x = torch.randn(n_samples, 8)
    y = torch.stack([x[:, 0], -x[:, 1], x[:, 2] * x[:, 3]], dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    def fit(epochs: int, ckpt_path: str | None = None) -> tuple[nn.Module, L.Trainer]:
        model = MultiOutputRegression()
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model, trainer

    with torch.no_grad():
        before = ((MultiOutputRegression().net(x) - y) ** 2).mean()
    reference, _ = fit(max_epochs + 1)  # uninterrupted

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "jd.ckpt")
        _, trainer = fit(max_epochs)
        trainer.save_checkpoint(path)
        saved = torch.load(path, weights_only=False)["optimizer_states"][0]
        assert {"state", "param_groups", "jdoptim"} <= set(saved)
        resumed, _ = fit(max_epochs + 1, ckpt_path=path)  # one more epoch

    for p, q in zip(resumed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with torch.no_grad():
        after = ((resumed.net(x) - y) ** 2).mean()
    print(f"mean loss: {before:.3f} -> {after:.3f}; the resumed run matches the uninterrupted one")
    assert after < before


if __name__ == "__main__":
    main()
