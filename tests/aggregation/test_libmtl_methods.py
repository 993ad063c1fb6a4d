"""GradNorm, DB-MTL and MoCo (not in torchjd): their definitions, invariants and JDOptimizer
use (the optimizer passes them the losses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim import JDOptimizer
from jdoptim.aggregation import DBMTL, DBMTLWeighting, GradNorm, GradNormWeighting, MoCo

_G = torch.Generator().manual_seed(0)
_JS = [torch.randn(3, 5, generator=_G, dtype=torch.float64) for _ in range(4)]
_LS = [torch.rand(3, generator=_G, dtype=torch.float64) + 0.5 for _ in range(4)]


def test_gradnorm_follows_its_definition() -> None:
    w = GradNormWeighting(alpha=1.5, lr=0.1)
    weights = torch.ones(3, dtype=torch.float64)
    initial = _LS[0]
    for J, L in zip(_JS, _LS, strict=True):
        w.observe_losses(L)
        out = w(J @ J.T)
        torch.testing.assert_close(out, weights)
        n = J.norm(dim=1)
        rates = (L / initial) / (L / initial).mean()
        target = (weights * n).mean() * rates**1.5
        stepped = (weights - 0.1 * torch.sign(weights * n - target) * n).clamp(min=0)
        weights = 3 * stepped / stepped.sum()
    assert abs(float(weights.sum()) - 3) < 1e-12
    with pytest.raises(ValueError, match="needs the losses"):
        GradNormWeighting()(torch.eye(2))


def test_dbmtl_is_invariant_to_loss_scales() -> None:
    # Scaling loss i (and so its gradient) by c_i leaves the update unchanged.
    c = torch.tensor([1.0, 10.0, 0.01], dtype=torch.float64)
    a, b = DBMTL(beta=0.9), DBMTL(beta=0.9)
    for J, L in zip(_JS, _LS, strict=True):
        a.observe_losses(L)
        b.observe_losses(c * L)
        # Up to the 1e-8 guards, relative to losses down to ~5e-3.
        torch.testing.assert_close(a(J), b(c.unsqueeze(1) * J), rtol=1e-5, atol=1e-9)
    # beta = 0: the Gramian weighting gives the aggregator's update.
    J, L = _JS[0], _LS[0]
    gramian = DBMTLWeighting()
    gramian.observe_losses(L)
    stateless = DBMTL(beta=0.0)
    stateless.observe_losses(L)
    torch.testing.assert_close(gramian(J @ J.T) @ J, stateless(J))


def _moco_reference(js, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
    y = np.zeros_like(js[0])
    lam = np.full(js[0].shape[0], 1 / js[0].shape[0])
    out = []
    for t, J in enumerate(js, start=1):
        y = y - beta / t**beta_sigma * (y - J)
        z = lam - gamma / t**gamma_sigma * ((y @ y.T + rho * np.eye(len(lam))) @ lam)
        lam = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        out.append(y.T @ lam)
    return out


def test_moco_matches_a_direct_implementation_and_resets() -> None:
    moco = MoCo(rho=0.1, normalize=False)
    expected = _moco_reference([J.numpy() for J in _JS], rho=0.1)
    for J, ref in zip(_JS, expected, strict=True):
        np.testing.assert_allclose(moco(J).numpy(), ref, rtol=1e-12, atol=1e-12)
    moco.reset()
    np.testing.assert_allclose(moco(_JS[0]).numpy(), expected[0], rtol=1e-12)


@pytest.mark.parametrize(
    "make", [lambda: GradNorm(), lambda: DBMTL(), lambda: MoCo()], ids=["GradNorm", "DBMTL", "MoCo"]
)
def test_jdoptimizer_passes_the_losses(make) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), make())
    before = model.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        opt.step(((model(x) - y) ** 2).mean(0))
    assert not torch.equal(model.weight, before)


def test_moco_and_dbmtl_compile_whole_and_follow_eager() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    for make in (lambda: MoCo(rho=0.1), lambda: DBMTL(beta=0.9, beta_sigma=0.5)):
        eager, compiled_obj = make(), make()
        for obj in (eager, compiled_obj):
            if isinstance(obj, (DBMTL, MoCo)):
                obj.observe_losses(_LS[0])
        first = [eager(_JS[0]), compiled_obj(_JS[0])]  # lazy state creation stays eager
        torch.testing.assert_close(first[0], first[1])
        compiled = torch.compile(lambda J, o=compiled_obj: o(J), fullgraph=True)
        for J in _JS[1:]:
            torch.testing.assert_close(compiled(J), eager(J), rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()
