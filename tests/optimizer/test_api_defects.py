"""API habits: ``torch.no_grad()`` around a step, sparse embeddings, a weighting class instead of
an instance, duplicated parameters and LBFGS."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer, jd_backward
from jdoptim._functional import WeightingStrategy
from jdoptim.aggregation import MeanWeighting, UPGrad, UPGradWeighting
from jdoptim.gramian import JacobianEngine, MultiTaskGramianEngine

from ._helpers import InverseNormWeighting


class _MTL(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


def _optimizer(engine: str, model: nn.Module) -> JDOptimizer:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    if engine == "multitask":
        mt = MultiTaskGramianEngine(model.trunk, model.heads)
        return JDOptimizer(sgd, InverseNormWeighting(), engine=mt)
    kwargs = {"model": model, "batch_dim": 0} if engine == "layerwise" else {}
    return JDOptimizer(sgd, InverseNormWeighting(), engine=engine, **kwargs)


def _losses(engine: str, model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    # Per-sample losses for the layer-wise engine, one loss per task otherwise.
    return out.pow(2).sum(1) if engine == "layerwise" else out.pow(2).mean(0)


# ------------------------------------------------------------------------------ no_grad


@pytest.mark.parametrize("engine", ["jacobian", "layerwise", "multitask"])
@pytest.mark.parametrize("call", ["step", "backward", "closure"])
def test_step_backward_and_closure_work_under_no_grad(engine: str, call: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    results = []
    for no_grad in (False, True):
        torch.manual_seed(1)
        model = _MTL()
        opt = _optimizer(engine, model)
        context = torch.no_grad() if no_grad else torch.enable_grad()
        if call == "closure":
            with context:
                weights = opt.step(closure=lambda model=model, opt=opt: _losses(engine, model, x))
        else:
            losses = _losses(engine, model, x)  # built with grad, as for loss.backward()
            with context:
                weights = getattr(opt, call)(losses)
                assert not torch.is_grad_enabled() if no_grad else True
        results.append((weights, [p.detach().clone() for p in model.parameters()]))
        results[-1][1].extend(p.grad.clone() for p in model.parameters())
    (w0, t0), (w1, t1) = results
    torch.testing.assert_close(w1, w0)
    for a, b in zip(t0, t1, strict=True):
        torch.testing.assert_close(a, b)


def test_no_grad_is_restored_after_the_step() -> None:
    model = nn.Linear(3, 2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MeanWeighting())
    losses = model(torch.randn(4, 3)).pow(2).mean(0)
    with torch.no_grad():
        opt.step(losses)
        assert not torch.is_grad_enabled()


# ------------------------------------------------------------------------------ sparse embedding


class _Bag(nn.Module):
    def __init__(self, sparse: bool, bag: bool = False) -> None:
        super().__init__()
        cls = nn.EmbeddingBag if bag else nn.Embedding
        self.emb = cls(10, 4, sparse=sparse)
        self.out = nn.Linear(4, 2)

    def forward(self, idx: Tensor) -> Tensor:
        e = self.emb(idx)
        return self.out(e if e.ndim == 2 else e.sum(1))


IDX = torch.tensor([[1, 2], [3, 1], [0, 9]])


@pytest.mark.parametrize("bag", [False, True])
@pytest.mark.parametrize("engine", ["jacobian", "layerwise-instance"])
def test_sparse_embedding_without_model_raises_a_clear_error_at_the_step(
    bag: bool, engine: str
) -> None:
    from jdoptim.gramian import LayerwiseGramianEngine

    model = _Bag(sparse=True, bag=bag)
    eng = LayerwiseGramianEngine(model) if engine == "layerwise-instance" else "jacobian"
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MeanWeighting(), engine=eng)
    before = [p.detach().clone() for p in model.parameters()]
    losses = model(IDX).pow(2).sum(1)
    kind = "EmbeddingBag" if bag else "Embedding"
    with pytest.raises(ValueError, match=rf"nn\.{kind}\(sparse=True\).*\(10, 4\).*sparse=False"):
        opt.step(losses)
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.grad is None
        assert torch.equal(p, b)


def test_sparse_embedding_with_model_raises_at_construction_naming_the_module() -> None:
    model = _Bag(sparse=True)
    with pytest.raises(ValueError, match=r"Module 'emb' \(Embedding\(10, 4, sparse=True\)\)"):
        JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), MeanWeighting(), model=model, batch_dim=0
        )
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 0  # the refused optimizer left no hook behind


def test_sparse_embedding_outside_the_jacobian_gets_its_ordinary_sparse_gradient() -> None:
    torch.manual_seed(0)
    model = _Bag(sparse=True)
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        MeanWeighting(),
        params=list(model.out.parameters()),
        other_params_grad="sum",
        model=model,
    )
    losses = model(IDX).pow(2).sum(1)
    opt.backward(losses)
    grad = model.emb.weight.grad
    assert grad is not None and grad.layout == torch.sparse_coo
    (expected,) = torch.autograd.grad(model(IDX).pow(2).sum(), [model.emb.weight])
    torch.testing.assert_close(grad.to_dense(), expected.to_dense())


# ------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("cls", [UPGradWeighting, UPGrad, MeanWeighting])
def test_a_weighting_class_says_instantiate_it(cls: type) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=rf"class `{cls.__name__}`: instantiate it"):
        JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), cls)
    with pytest.raises(TypeError, match="instantiate it"):
        WeightingStrategy(cls)


def test_lbfgs_is_rejected_at_construction() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="LBFGS is not supported"):
        JDOptimizer(torch.optim.LBFGS(model.parameters()), MeanWeighting())


# ------------------------------------------------------------------------------ duplicates


def _reference_grad(w: Tensor, weighting) -> Tensor:
    """JD gradient of the same losses with ``w`` listed once."""
    v = w.detach().clone().requires_grad_(True)
    out = jd_backward(
        torch.stack([v.sum(), (2 * v - 1).pow(2).sum()]),
        [v],
        WeightingStrategy(weighting),
        JacobianEngine(),
    )
    assert out.weights is not None
    return v.grad


def test_a_parameter_listed_twice_in_the_inner_optimizer_gets_its_gradient_once() -> None:
    w = nn.Parameter(torch.tensor([0.3, -1.0]))
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch.optim's own warning
        inner = torch.optim.SGD([w, w], lr=0.1)
    opt = JDOptimizer(inner, InverseNormWeighting())
    opt.backward(torch.stack([w.sum(), (2 * w - 1).pow(2).sum()]))
    torch.testing.assert_close(w.grad, _reference_grad(w, InverseNormWeighting()))


def test_a_parameter_listed_twice_in_params_warns_and_counts_once() -> None:
    w = nn.Parameter(torch.tensor([0.3, -1.0]))
    b = nn.Parameter(torch.tensor([0.5]))
    inner = torch.optim.SGD([w, b], lr=0.1)
    with pytest.warns(UserWarning, match="more than once"):
        opt = JDOptimizer(inner, InverseNormWeighting(), params=[w, w])
    opt.backward(torch.stack([w.sum() + b.sum(), (2 * w - 1).pow(2).sum()]))
    torch.testing.assert_close(w.grad, _reference_grad(w, InverseNormWeighting()))


def test_distinct_parameters_do_not_warn() -> None:
    model = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            MeanWeighting(),
            params=[model.weight],
        )


@pytest.mark.parametrize("make", ["Mean", "GeometricMean"])
def test_scalarizer_step_works_under_no_grad(make: str) -> None:
    from jdoptim import scalarization

    grads = []
    for no_grad in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        scalarizer = getattr(scalarization, make)()
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scalarizer)
        losses = model(torch.randn(4, 3)).pow(2).mean(0)
        with torch.no_grad() if no_grad else torch.enable_grad():
            opt.step(losses)
        grads.append(model.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
