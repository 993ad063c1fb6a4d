"""``torch.compile`` of a whole JD train step: forward, losses, Jacobian descent, inner step.

:class:`jdoptim.JDOptimizer` calls :func:`jdoptim.configure_compile` at construction, which lets
Dynamo trace the autograd calls of the step. The JD part (batched backward, Gramian, UPGrad's
solver loop, weighted gradient) becomes one graph with no break; the inner optimizer's
``step`` is compiled as a separate graph (torch breaks the graph there on purpose), so the
whole step is compiled with the default ``fullgraph=False``. ``opt.backward(losses)`` alone
compiles with ``fullgraph=True``.

``nonfinite="propagate"`` keeps the step free of host synchronisation (the default ``"raise"``
defers its one check to the next ``step``, see the FAQ). The compiled step follows the eager
one to float32 precision and compiles once: new batches of the same shape reuse the graphs.
"""

import time

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGradWeighting


def make(seed: int = 0) -> tuple[nn.Module, JDOptimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), UPGradWeighting(), nonfinite="propagate"
    )
    return model, optimizer


def make_train_step(model: nn.Module, optimizer: JDOptimizer):
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = ((model(x) - y) ** 2).mean(dim=0)  # four losses
        optimizer.zero_grad()  # JDOptimizer.zero_grad is safe inside a compiled function
        return optimizer.step(losses)

    return train_step


def main(steps: int = 5, backend: str = "inductor") -> None:
    torch._dynamo.reset()
    eager_model, eager_opt = make()
    model, optimizer = make()
    eager_step = make_train_step(eager_model, eager_opt)
    compiled_step = torch.compile(make_train_step(model, optimizer), backend=backend)

    # The JD part alone is a single graph:
    def jd_part(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return optimizer.backward(((model(x) - y) ** 2).mean(dim=0))

    x, y = torch.randn(32, 16), torch.randn(32, 4)
    explanation = torch._dynamo.explain(jd_part)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    optimizer.zero_grad()
    torch._dynamo.reset()

    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(steps):
        x = torch.randn(32, 16, generator=generator)
        y = torch.randn(32, 4, generator=generator)
        weights = compiled_step(x, y)
        if step == 0:
            print(f"first (compiling) step: {time.perf_counter() - start:.1f} s")
        torch.testing.assert_close(weights, eager_step(x, y), rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    print(f"{steps} compiled steps match eager; weights of the last one: {weights}")


if __name__ == "__main__":
    main()
