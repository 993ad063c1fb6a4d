"""Every public constructor parameter is a validated property that takes effect on the next call.

One case per (class, parameter): setting a new value on a default-built object must give the
value back, the same ``repr`` and the same output as an object built with that value, and
setting an invalid value must raise exactly the constructor's error and leave the old value.
A meta-test checks that every constructor parameter of every public class has a case.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

import jdoptim.aggregation as agg
from jdoptim.aggregation._losses import LossAware
from jdoptim.linalg import QuadprogProjector
from jdoptim.solvers._eager_compile import eager_compilation_enabled, set_eager_compilation

M = 6
_J = torch.tensor(
    [
        [1.0, 2.0, -1.0, 0.5],
        [-2.0, 1.0, 0.0, 1.0],
        [0.5, -1.0, 2.0, 0.0],
        [1.0, 1.0, 1.0, 1.0],
        [3.0, -0.5, 0.2, -1.0],
        [0.0, 2.0, -2.0, 0.3],
    ],
    dtype=torch.float64,
)
_PREF = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.25, 1.0], dtype=torch.float64)
_BAD_PREF = torch.ones(2, 2)


def _sqrt(p: torch.Tensor) -> torch.Tensor:
    return p.sqrt()


_INNER = agg.MeanWeighting()
_NEW_INNER = agg.UPGradWeighting()

# (class, base constructor kwargs, parameter, new valid value, invalid value or None)
CASES: list[tuple[type, dict, str, object, object]] = []


def _case(cls: type, base: dict, name: str, new: object, bad: object = None) -> None:
    CASES.append((cls, base, name, new, bad))


for _cls in (agg.UPGrad, agg.UPGradWeighting, agg.DualProj, agg.DualProjWeighting):
    _case(_cls, {}, "pref_vector", _PREF, _BAD_PREF)
    _case(_cls, {}, "norm_eps", 0.5, -1.0)
    _case(_cls, {}, "reg_eps", 0.01, -0.5)
    _case(_cls, {}, "solver", "quadprog", "bad")
    _case(_cls, {}, "warm_start", True)
    _case(_cls, {}, "projector", QuadprogProjector(norm_eps=0.5))
for _cls in (agg.AlignedMTL, agg.AlignedMTLWeighting):
    _case(_cls, {}, "pref_vector", _PREF, _BAD_PREF)
    _case(_cls, {}, "scale_mode", "rmse", "bad")
_case(agg.ConFIG, {}, "pref_vector", _PREF, _BAD_PREF)
for _cls in (agg.CAGrad, agg.CAGradWeighting):
    _case(_cls, {"c": 0.5}, "c", 1.25, -1.0)
    _case(_cls, {"c": 0.5}, "norm_eps", 0.5, -0.1)
    _case(_cls, {"c": 0.5}, "solver", "torch", "bad")
for _cls in (agg.Constant, agg.ConstantWeighting):
    _case(_cls, {"weights": torch.ones(M, dtype=torch.float64)}, "weights", _PREF, _BAD_PREF)
for _cls in (agg.Krum, agg.KrumWeighting):
    _case(_cls, {"n_byzantine": 1}, "n_byzantine", 2, -1)
    _case(_cls, {"n_byzantine": 1}, "n_selected", 3, 0)
for _cls in (agg.MGDA, agg.MGDAWeighting):
    _case(_cls, {}, "epsilon", 0.1, 0.0)
    _case(_cls, {}, "max_iters", 2, 0)
for _cls in (agg.STCH, agg.STCHWeighting):
    _case(_cls, {}, "mu", 0.5, 0.0)
    _case(_cls, {}, "warmup_steps", 2, 0)
    _case(_cls, {}, "eps", 1e-8)
_case(agg.TrimmedMean, {"trim_number": 1}, "trim_number", 2, -1)
_case(agg.GradDrop, {}, "leak", _PREF, _BAD_PREF)
_case(agg.GradDrop, {}, "f", _sqrt)
_case(agg.Flattening, {"weighting": _INNER}, "weighting", _NEW_INNER)
_case(agg.NashMTL, {"n_tasks": 3}, "n_tasks", M, 0)
_case(agg.NashMTL, {"n_tasks": M}, "max_norm", 0.5, -1.0)
_case(agg.NashMTL, {"n_tasks": M}, "update_weights_every", 2, 0)
_case(agg.NashMTL, {"n_tasks": M}, "optim_niter", 3, 0)
for _cls in (agg.ExcessMTL, agg.ExcessMTLWeighting):
    _case(_cls, {}, "robust_step_size", 0.5, 0.0)
    _case(_cls, {}, "n_warmup_steps", 2, -1)
for _cls in (agg.FairGrad, agg.FairGradWeighting):
    _case(_cls, {"alpha": 1.0}, "alpha", 2.0)
    _case(_cls, {"alpha": 1.0}, "max_iters", 3)
for _cls in (agg.PCD, agg.PCDWeighting):
    _case(_cls, {}, "tau", 0.5, 1.5)
    _case(_cls, {}, "beta", 0.5, 1.0)
    _case(_cls, {}, "eps", 0.1, -1.0)
for _cls in (agg.GradVac, agg.GradVacWeighting):
    _case(_cls, {}, "beta", 0.1, 1.5)
    _case(_cls, {}, "eps", 0.0, -1.0)
_case(agg.CRMOGMWeighting, {"weighting": _INNER}, "weighting", _NEW_INNER)
_case(agg.CRMOGMWeighting, {"weighting": _INNER}, "alpha", 0.5, 1.5)
_case(agg.CRMOGMWeighting, {"weighting": _INNER}, "initial_weights", _PREF)
_case(agg.MoDoWeighting, {}, "gamma", 0.5, 0.0)
_case(agg.MoDoWeighting, {}, "rho", 0.0, -0.1)
_case(agg.SDMGradWeighting, {}, "lr", 1.0, 0.0)
_case(agg.SDMGradWeighting, {}, "momentum", 0.0, 1.0)
_case(agg.SDMGradWeighting, {}, "n_iter", 3, 0)
_case(agg.SDMGradWeighting, {}, "lambda_", 1.0, -1.0)
_case(agg.SDMGradWeighting, {}, "pref_vector", _PREF, _BAD_PREF)
for _cls in (agg.GradNorm, agg.GradNormWeighting):
    _case(_cls, {}, "alpha", 0.5, -1.0)
    _case(_cls, {}, "lr", 0.5, 0.0)
_case(agg.DBMTL, {}, "beta", 0.5, 1.5)
_case(agg.DBMTL, {}, "beta_sigma", 0.5, -1.0)
for _name, _bad in (("beta", -1.0), ("beta_sigma", -1.0), ("gamma", -1.0)):
    _case(agg.MoCo, {}, _name, 0.3, _bad)
_case(agg.MoCo, {}, "gamma_sigma", 0.3, -1.0)
_case(agg.MoCo, {}, "rho", 0.3, -1.0)
_case(agg.MoCo, {}, "normalize", False)


@pytest.fixture(autouse=True, scope="module")
def _eager_solvers():
    # The setters, not the solvers' compiled kernels, are under test: skip their compilation.
    previous = eager_compilation_enabled()
    set_eager_compilation(False)
    yield
    set_eager_compilation(previous)


def _ids(case: tuple) -> str:
    return f"{case[0].__name__}.{case[2]}"


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b or a is b


def _output(obj: object) -> torch.Tensor:
    torch.manual_seed(0)
    for module in obj.modules():
        if isinstance(module, LossAware):
            module.observe_losses(torch.arange(1.0, M + 1, dtype=torch.float64))
    if isinstance(obj, agg.Aggregator):
        return obj(_J)
    if isinstance(obj, agg.GeneralizedWeighting):
        return obj((_J @ _J.T).reshape(2, 3, 2, 3).permute(0, 1, 3, 2))
    return obj(_J @ _J.T)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_setter_validates_and_takes_effect(case: tuple) -> None:
    cls, base, name, new, bad = case
    obj = cls(**base)
    with contextlib.suppress(ValueError):  # NashMTL(n_tasks=3) refuses the 6-row input
        _output(obj)  # a call before the change: the new value must still be used afterwards
    if isinstance(obj, agg.Stateful):
        obj.reset()
    setattr(obj, name, new)
    assert _same(getattr(obj, name), new)
    fresh = cls(**{**base, name: new})
    assert repr(obj) == repr(fresh)
    assert str(obj) == str(fresh)
    torch.testing.assert_close(_output(obj), _output(fresh), rtol=0, atol=0)
    inner = getattr(obj, "gramian_weighting", None) or getattr(obj, "weighting", None)
    if isinstance(obj, agg.Aggregator) and inner is not None and hasattr(type(inner), name):
        assert _same(getattr(inner, name), new)  # the wrapper forwards to its weighting

    if bad is None:
        return
    with pytest.raises(Exception) as at_construction:
        cls(**{**base, name: bad})
    with pytest.raises(type(at_construction.value)) as at_setter:
        setattr(obj, name, bad)
    assert str(at_setter.value) == str(at_construction.value)
    assert _same(getattr(obj, name), new)  # a refused value leaves the old one


def _concrete_public_classes() -> list[type]:
    bases = (agg.Aggregator, agg.Weighting, agg.GeneralizedWeighting)
    return [
        c
        for name in agg.__all__
        if isinstance(c := getattr(agg, name), type)
        and issubclass(c, bases)
        and not inspect.isabstract(c)
        and c not in (agg.WeightedAggregator, agg.GramianWeightedAggregator)
    ]


def test_every_constructor_parameter_has_a_case() -> None:
    covered = {(cls, name) for cls, _, name, _, _ in CASES}
    missing = [
        f"{cls.__name__}.{p}"
        for cls in _concrete_public_classes()
        for p in inspect.signature(cls.__init__).parameters
        if p != "self" and (cls, p) not in covered
    ]
    assert not missing, f"constructor parameters without a setter case: {missing}"
