"""Migrating from torchjd: the jdoptim counterpart of each torchjd pattern.

Each section below rewrites one torchjd idiom (quoted in the comment above it) with jdoptim and
checks that the alternatives agree. See the table in the documentation ("Migrating from
torchjd") for the side-by-side summary.
"""

import torch
from torch import nn

from jdoptim import JDOptimizer, WeightingStrategy, jd_backward
from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.gramian import JacobianEngine, LayerwiseGramianEngine, MultiTaskGramianEngine


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 5), torch.randn(32, 3)

    def task_losses() -> torch.Tensor:
        return ((model(x) - y) ** 2).mean(dim=0)

    # 1. torchjd: autojac.backward(losses) then jac_to_grad(model.parameters(), UPGrad())
    #    (older releases: torchjd.backward(losses, UPGrad())), then optimizer.step().
    #    jdoptim: one optimizer that does both.
    optimizer = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    optimizer.zero_grad()
    optimizer.backward(task_losses())  # .grad = J^T w; optimizer.step() would apply it
    from_optimizer = grads(model)

    #    ... or the functional form, without an optimizer:
    model.zero_grad()
    jd_backward(
        task_losses(), list(model.parameters()), WeightingStrategy(UPGrad()), JacobianEngine()
    )
    torch.testing.assert_close(grads(model), from_optimizer)

    # 2. torchjd: mtl_backward(losses, features) + jac_to_grad(shared_params, UPGrad()):
    #    JD on the shared parameters, the plain gradient of each task's loss for its head.
    #    jdoptim: partial JD with `params=` and other_params_grad="sum".
    trunk, head = model[:2], model[2]
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGradWeighting(),
        params=trunk.parameters(),
        other_params_grad="sum",
    )
    optimizer.zero_grad()
    losses = task_losses()
    optimizer.backward(losses, retain_graph=True)
    torch.testing.assert_close(head.weight.grad, torch.autograd.grad(losses.sum(), head.weight)[0])

    #    With one head module per task, the multi-task engine (told the trunk and the heads, as
    #    torchjd is told the features) gives the same update faster.
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

    def head_losses() -> torch.Tensor:
        z = trunk(x)
        return torch.stack([((h(z)[:, 0] - y[:, k]) ** 2).mean() for k, h in enumerate(heads)])

    updates = []
    for engine in (JacobianEngine(), MultiTaskGramianEngine(trunk, heads)):
        optimizer = JDOptimizer(
            torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1),
            UPGradWeighting(),
            params=trunk.parameters(),
            other_params_grad="sum",
            engine=engine,
        )
        optimizer.zero_grad()
        optimizer.backward(head_losses())
        updates.append(torch.cat([p.grad.reshape(-1) for p in optimizer.param_groups[0]["params"]]))
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-4, atol=1e-6)

    # 3. torchjd: engine = autogram.Engine(model, batch_dim=0); gramian =
    #    engine.compute_gramian(losses); weights = UPGradWeighting()(gramian);
    #    losses.backward(weights).
    #    jdoptim: model= and batch_dim= select the layer-wise Gramian engine.
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGradWeighting(), model=model, batch_dim=0
    )
    assert isinstance(optimizer.engine, LayerwiseGramianEngine)
    optimizer.zero_grad()
    per_sample = ((model(x) - y) ** 2).mean(dim=1)  # [32]: one loss per sample
    optimizer.backward(per_sample)
    layerwise = grads(model)
    model.zero_grad()
    per_sample = ((model(x) - y) ** 2).mean(dim=1)
    strategy = WeightingStrategy(UPGradWeighting())
    jd_backward(per_sample, list(model.parameters()), strategy, JacobianEngine())
    torch.testing.assert_close(grads(model), layerwise, rtol=1e-4, atol=1e-6)
    optimizer.engine.remove()  # unhook the model

    # 4. Aggregators and weightings keep torchjd's names, parameters and numbers:
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    print(UPGrad()(J))  # tensor([0.2929, 1.9004, 1.9004]), as torchjd's UPGrad()

    # 5. torchjd: UPGrad(projector=QuadprogProjector(norm_eps=..., reg_eps=...))
    #    (before 0.11: UPGrad(norm_eps=..., reg_eps=..., solver="quadprog")).
    #    jdoptim: UPGrad(norm_eps=..., reg_eps=..., solver="torch") (default: sync-free,
    #    compilable) or solver="quadprog" (the exact CPU reference, eager only).
    exact = UPGrad(norm_eps=1e-4, reg_eps=1e-4, solver="quadprog")(J)
    torch.testing.assert_close(UPGrad(solver="torch")(J), exact, rtol=1e-5, atol=1e-6)
    #    torchjd >= 0.11's projector= form runs unchanged (jdoptim.linalg):
    from jdoptim.linalg import QuadprogProjector, TorchProjector

    torch.testing.assert_close(UPGrad(projector=QuadprogProjector())(J), exact)
    torch.testing.assert_close(UPGrad(projector=TorchProjector())(J), exact, rtol=1e-5, atol=1e-6)

    # 6. torchjd 0.18's scalarizers: same names; JDOptimizer takes a step from them alone.
    from jdoptim.scalarization import FAMO

    model2 = torch.nn.Linear(3, 2)
    opt2 = JDOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1), FAMO(2))
    x2, y2 = torch.randn(8, 3), torch.randn(8, 2)
    opt2.step(closure=lambda: ((model2(x2) - y2) ** 2).mean(0))  # backward, step, FAMO update
    print("all torchjd patterns have a matching jdoptim call")


if __name__ == "__main__":
    main()
