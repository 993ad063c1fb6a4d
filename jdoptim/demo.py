"""Demo: Jacobian descent against a plain optimizer on scikit-learn's digits (offline).

Run ``python -m jdoptim.demo`` (needs the ``demo`` extra: ``pip install "jdoptim[demo]"``).

Two set-ups are trained, each with a plain optimizer and with :class:`jdoptim.JDOptimizer`:

* **multi-task** (``mtl``): a shared MLP with three heads and three losses: the digit (10-way
  cross-entropy), its parity and whether it is greater than 4 (binary cross-entropies). The plain
  optimizer minimises the mean of the three losses.
* **per-sample** (``iwrm``, instance-wise risk minimisation): each sample's cross-entropy in a
  batch is its own objective; the plain optimizer minimises their mean.

At every step the demo also checks whether the update direction :math:`d` (before momentum)
conflicted with some objective, i.e. whether :math:`\\langle g_i, d\\rangle < 0` for a row
:math:`g_i` of the Jacobian, beyond the slack that UPGrad's ridge allows (see ``_conflicts``; the
check is not part of the timed step). It prints a progress bar per epoch
and a summary table; ``--plot out.png`` writes the curves and the weights over time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import jdoptim.aggregation as aggregation
from jdoptim import JDOptimizer
from jdoptim.gramian import MultiTaskGramianEngine

GRAMIAN_WEIGHTINGS = {
    "UPGrad": lambda: aggregation.UPGradWeighting(),
    "DualProj": lambda: aggregation.DualProjWeighting(),
    "MGDA": lambda: aggregation.MGDAWeighting(),
    "IMTLG": lambda: aggregation.IMTLGWeighting(),
    "AlignedMTL": lambda: aggregation.AlignedMTLWeighting(),
    "CAGrad": lambda: aggregation.CAGradWeighting(c=0.5),
    "PCGrad": lambda: aggregation.PCGradWeighting(),
    "STCH": lambda: aggregation.STCHWeighting(),
    "Random": lambda: aggregation.RandomWeighting(),
    "Mean": lambda: aggregation.MeanWeighting(),
}

TASKS = ("digit", "parity", "greater_than_4")
RIDGE = 1e-4


def _require_demo_extra() -> None:
    missing = []
    for module in ("sklearn", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(f'The demo needs {missing}: install them with  pip install "jdoptim[demo]"')


@dataclass
class Digits:
    """Digits split into train and test tensors (features scaled to [0, 1])."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


class MultiTaskNet(nn.Module):
    """Shared trunk 64 -> 64 -> 64 and three heads (digit, parity, greater than 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.digit = nn.Linear(64, 10)
        self.parity = nn.Linear(64, 1)
        self.greater = nn.Linear(64, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.trunk(x)
        return self.digit(h), self.parity(h).squeeze(-1), self.greater(h).squeeze(-1)


def mtl_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    digit, parity, greater = model(x)
    return torch.stack(
        [
            F.cross_entropy(digit, y),
            F.binary_cross_entropy_with_logits(parity, (y % 2).float()),
            F.binary_cross_entropy_with_logits(greater, (y > 4).float()),
        ]
    )


def mtl_metrics(model: nn.Module, data: Digits) -> dict[str, float]:
    with torch.no_grad():
        digit, parity, greater = model(data.x_test)
        y = data.y_test
        return {
            "digit": (digit.argmax(-1) == y).float().mean().item(),
            "parity": ((parity > 0) == (y % 2 == 1)).float().mean().item(),
            "greater_than_4": ((greater > 0) == (y > 4)).float().mean().item(),
        }


def iwrm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def iwrm_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def iwrm_metrics(model: nn.Module, data: Digits) -> dict[str, float]:
    with torch.no_grad():
        logits = model(data.x_test)
        return {
            "accuracy": (logits.argmax(-1) == data.y_test).float().mean().item(),
            "test_loss": F.cross_entropy(logits, data.y_test).item(),
        }


@dataclass
class RunResult:
    """What one training run measured."""

    method: str
    metrics: dict[str, float]
    step_ms: float
    conflict_rate: float
    loss_curve: list[list[float]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


def _jacobian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The ``[m, n]`` Jacobian of ``losses`` (flattened) with respect to ``params``."""
    m = losses.numel()
    rows = torch.autograd.grad(
        losses.reshape(-1),
        params,
        torch.eye(m, dtype=losses.dtype),
        is_grads_batched=True,
        allow_unused=True,
        materialize_grads=True,
    )
    return torch.cat([r.reshape(m, -1) for r in rows], dim=1)


def _conflicts(jacobian: Tensor, weights: Tensor) -> bool:
    """Whether the update ``d = J^T w`` conflicts with some row ``g_i`` of ``J``.

    UPGrad and DualProj regularise the normalised Gramian with a ridge ``reg_eps = 1e-4``, which
    only guarantees :math:`\\langle g_i, d \\rangle \\ge -\\varepsilon\\,\\mathrm{tr}(G)\\,w_i`.
    The same slack (plus a relative rounding tolerance) is granted to every method, so a
    conflict is :math:`\\langle g_i, d \\rangle < -\\varepsilon\\,\\mathrm{tr}(G)|w_i|
    - 10^{-6} \\max_j |\\langle g_j, d \\rangle|`."""
    w = weights.reshape(-1)
    inner = jacobian @ (w @ jacobian)
    trace = jacobian.pow(2).sum()
    slack = RIDGE * trace * w.abs() + 1e-6 * inner.abs().max()
    return bool((inner < -slack).any())


def train(
    setup: str,
    method: str,
    data: Digits,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    compile_step: bool,
    quiet: bool,
) -> RunResult:
    from tqdm import tqdm

    torch.manual_seed(seed)
    if setup == "mtl":
        model, losses_fn, metrics_fn = MultiTaskNet(), mtl_losses, mtl_metrics
    else:
        model, losses_fn, metrics_fn = iwrm_model(), iwrm_losses, iwrm_metrics
    params = [p for p in model.parameters()]
    inner = torch.optim.SGD(params, lr=lr, momentum=0.9)
    jd = None
    if method != "plain":
        # Per-sample losses: the layer-wise engine builds the Gramian from the layers' inputs and
        # output gradients (``model=``, ``batch_dim=``); multi-task: the multi-task engine on the
        # shared trunk and the three heads (in the order of the losses).
        if setup == "iwrm":
            jd = JDOptimizer(inner, GRAMIAN_WEIGHTINGS[method](), model=model, batch_dim=0)
        else:
            assert isinstance(model, MultiTaskNet)
            heads = [model.digit, model.parity, model.greater]
            engine = MultiTaskGramianEngine(model.trunk, heads)
            jd = JDOptimizer(inner, GRAMIAN_WEIGHTINGS[method](), engine=engine)

    # zero_grad stays outside the (possibly compiled) step: with the autograd tracing that
    # jdoptim.configure_compile switches on, torch 2.13 loses the gradients of a traced
    # ``backward()`` that follows a traced ``zero_grad(set_to_none=True)`` (see docs/faq.rst).
    def plain_step(x: Tensor, y: Tensor) -> Tensor:
        losses = losses_fn(model, x, y)
        losses.mean().backward()
        inner.step()
        return losses.detach()

    def jd_step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        losses = losses_fn(model, x, y)
        weights = jd.step(losses)
        return losses.detach(), weights

    step: Callable = plain_step if jd is None else jd_step
    if compile_step:
        step = torch.compile(step)  # JDOptimizer configured torch.compile at construction

    generator = torch.Generator().manual_seed(seed)
    times, conflicts, curve, weight_trace = [], [], [], []
    n = len(data.x_train)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        batches = [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        bar = tqdm(
            batches,
            desc=f"{setup}/{method} epoch {epoch + 1}/{epochs}",
            disable=quiet,
            leave=False,
            file=sys.stdout,
        )
        for idx in bar:
            x, y = data.x_train[idx], data.y_train[idx]
            # Monitoring (untimed): the Jacobian before the step, to check whether the update
            # direction conflicts with one of the objectives.
            jacobian = _jacobian(losses_fn(model, x, y), params)
            if jd is None:
                m = jacobian.shape[0]
                w = torch.full((m,), 1.0 / m)
            start = time.perf_counter()
            inner.zero_grad()
            out = step(x, y)
            times.append(time.perf_counter() - start)
            if jd is not None:
                losses, w = out
                weight_trace.append(w.reshape(-1)[:3].tolist())
            else:
                losses = out
            conflicts.append(_conflicts(jacobian, w.detach()))
            curve.append(
                losses.reshape(-1).tolist()[:3] if setup == "mtl" else [losses.mean().item()]
            )
    warm = times[5:] if len(times) > 10 else times
    return RunResult(
        method=method,
        metrics=metrics_fn(model, data),
        step_ms=1e3 * statistics.median(warm),
        conflict_rate=sum(conflicts) / max(len(conflicts), 1),
        loss_curve=curve,
        weights=weight_trace,
    )


def format_table(setup: str, results: list[RunResult]) -> str:
    metric_names = list(results[0].metrics)
    header = ["method", *metric_names, "ms/step", "conflicting steps"]
    rows = [
        [
            r.method,
            *[f"{r.metrics[k]:.3f}" for k in metric_names],
            f"{r.step_ms:.2f}",
            f"{100 * r.conflict_rate:.0f}%",
        ]
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    title = {"mtl": "multi-task (digit / parity / >4)", "iwrm": "per-sample losses (IWRM)"}[setup]
    return "\n".join(
        [f"== {title} ==", line(header), line(["-" * w for w in widths]), *map(line, rows)]
    )


def plot(path: str, all_results: dict[str, list[RunResult]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(all_results)
    fig, axes = plt.subplots(2, len(setups), figsize=(6 * len(setups), 7), squeeze=False)
    for col, setup in enumerate(setups):
        ax = axes[0][col]
        for r in all_results[setup]:
            curve = torch.tensor(r.loss_curve)
            k = max(1, len(curve) // 50)
            smooth = curve[: len(curve) // k * k].reshape(-1, k, curve.shape[1]).mean(1)
            for t in range(smooth.shape[1]):
                label = f"{r.method}" + (f" / {TASKS[t]}" if setup == "mtl" else "")
                ax.plot(smooth[:, t], label=label, linestyle="-" if r.method != "plain" else "--")
        ax.set_title(f"{setup}: training losses")
        ax.set_xlabel("step (smoothed)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for r in all_results[setup]:
            if r.weights:
                w = torch.tensor(r.weights)
                for t in range(w.shape[1]):
                    name = TASKS[t] if setup == "mtl" else f"sample {t}"
                    ax.plot(w[:, t], label=f"{r.method}: {name}", linewidth=0.8)
        ax.set_title(f"{setup}: JD weights over time")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jdoptim.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--setup", choices=["mtl", "iwrm", "both"], default="both")
    parser.add_argument(
        "--weighting",
        choices=sorted(GRAMIAN_WEIGHTINGS),
        default="UPGrad",
        help="weighting used by JDOptimizer (default: UPGrad)",
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compile the training step")
    parser.add_argument("--plot", metavar="OUT.png", help="write loss curves and weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    _require_demo_extra()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = load_data(args.seed)
    setups = ["mtl", "iwrm"] if args.setup == "both" else [args.setup]
    all_results: dict[str, list[RunResult]] = {}
    for setup in setups:
        all_results[setup] = [
            train(
                setup,
                method,
                data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                compile_step=args.compile,
                quiet=args.quiet,
            )
            for method in ("plain", args.weighting)
        ]
        print(format_table(setup, all_results[setup]))
        print()
    if args.plot:
        plot(args.plot, all_results)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
