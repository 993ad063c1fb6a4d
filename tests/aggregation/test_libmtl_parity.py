"""GradNorm, DB-MTL and MoCo against eager float64 re-statements of LibMTL's update rules
(``LibMTL/weighting/{GradNorm,DB_MTL,MoCo}.py``), a few steps each. The re-statements take the
gradients with autograd where LibMTL does, so they share no code with jdoptim's closed forms."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import DBMTL, DBMTLWeighting, GradNorm, GradNormWeighting, MoCo

_F64 = torch.float64
_M, _N, _STEPS = 3, 5, 4


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(_M, 4, _N, generator=g, dtype=_F64)
    b = torch.randn(_M, 4, generator=g, dtype=_F64)
    theta = torch.randn(_N, generator=g, dtype=_F64)
    return a, b, theta


def _losses(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # Task i: 0.5 ||A_i theta - b_i||^2 + 0.1 * (i + 1) (different scales and minima).
    offsets = 0.1 * torch.arange(1, _M + 1, dtype=_F64)
    return 0.5 * ((a @ theta - b) ** 2).sum(1) + offsets


def _rows(fn, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The values ``fn(theta)`` and one autograd gradient per value (the Jacobian's rows)."""
    theta = theta.detach().requires_grad_(True)
    values = fn(theta)
    rows = [torch.autograd.grad(values[i], theta, retain_graph=True)[0] for i in range(_M)]
    return values.detach(), torch.stack(rows)


def _trajectory(step_of, steps: int = _STEPS):
    """Run ``steps`` steps of a model moving along ``-0.05 d``: the (losses, J) of each."""
    a, b, theta = _problem()
    out = []
    for _ in range(steps):
        losses, jac = _rows(lambda t: _losses(a, b, t), theta)
        out.append((losses, jac))
        theta = theta - 0.05 * step_of(losses, jac, theta)
    return out


def test_moco_matches_libmtl() -> None:
    beta, beta_sigma, gamma, gamma_sigma, rho = 0.5, 0.5, 0.1, 0.5, 0.2
    y = torch.zeros(_M, _N, dtype=_F64)
    lam = torch.full((_M,), 1 / _M, dtype=_F64)
    expected: list[torch.Tensor] = []

    def libmtl(losses: torch.Tensor, jac: torch.Tensor, _theta: torch.Tensor) -> torch.Tensor:
        nonlocal y, lam
        t = len(expected) + 1
        h = torch.stack(
            [jac[i] * losses[i] / (torch.linalg.vector_norm(jac[i]) + 1e-8) for i in range(_M)]
        )
        y = y + beta * t**-beta_sigma * (h - y)
        quadratic = y @ y.T + rho * torch.eye(_M, dtype=_F64)
        lam = torch.softmax(lam - gamma * t**-gamma_sigma * (quadratic @ lam), dim=-1)
        expected.append(lam @ y)
        return expected[-1]

    steps = _trajectory(libmtl)
    assert repr(MoCo()) == (  # LibMTL's defaults
        "MoCo(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, normalize=True)"
    )
    moco = MoCo(rho=rho)
    for (losses, jac), ref in zip(steps, expected, strict=True):
        moco.observe_losses(losses)
        torch.testing.assert_close(moco(jac), ref, rtol=1e-12, atol=1e-14)


def test_dbmtl_matches_libmtl() -> None:
    beta, beta_sigma = 0.9, 0.5
    a, b, _ = _problem()
    buffer = torch.zeros(_M, _N, dtype=_F64)
    expected: list[torch.Tensor] = []
    stateless: list[torch.Tensor] = []

    def libmtl(losses: torch.Tensor, jac: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        nonlocal buffer
        t = len(expected) + 1
        # LibMTL differentiates log(L + 1e-8) itself.
        _, log_jac = _rows(lambda th: torch.log(_losses(a, b, th) + 1e-8), theta)
        buffer = log_jac + beta / t**beta_sigma * (buffer - log_jac)
        norms = buffer.norm(dim=-1)
        expected.append(sum(norms.max() / (norms[i] + 1e-8) * buffer[i] for i in range(_M)))
        norms0 = log_jac.norm(dim=-1)  # beta = 0: the buffer is the current log-gradients
        stateless.append(sum(norms0.max() / (norms0[i] + 1e-8) * log_jac[i] for i in range(_M)))
        return expected[-1]

    steps = _trajectory(libmtl)
    assert (DBMTL().beta, DBMTL().beta_sigma) == (0.9, 0.0)  # LibMTL's defaults
    dbmtl, weighting = DBMTL(beta_sigma=beta_sigma), DBMTLWeighting()
    for (losses, jac), ref, ref0 in zip(steps, expected, stateless, strict=True):
        dbmtl.observe_losses(losses)
        weighting.observe_losses(losses)
        torch.testing.assert_close(dbmtl(jac), ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(weighting(jac @ jac.T) @ jac, ref0, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.5, 1.5, 2.5])
def test_gradnorm_matches_libmtl_gradient_with_the_papers_step(alpha: float) -> None:
    # LibMTL's L_grad and its autograd gradient in w; jdoptim takes the paper's step on w
    # (w - lr * grad, renormalised to sum m) where LibMTL steps on s with w = m softmax(s).
    lr = 0.05
    assert GradNorm().alpha == 1.5  # LibMTL's default
    w = torch.ones(_M, dtype=_F64)
    initial: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []

    def libmtl(losses: torch.Tensor, jac: torch.Tensor, _theta: torch.Tensor) -> torch.Tensor:
        nonlocal w
        if not initial:
            initial.append(losses)
        expected.append(w.clone())
        scale = w.clone().requires_grad_(True)
        # LibMTL's ||w_i g_i||, written w_i ||g_i||: equal for w_i > 0, but at w_i = 0 (never
        # reached with LibMTL's softmax, reached here after the clamp) autograd would give the
        # norm's subgradient 0 and a zeroed weight could never come back.
        per_task = scale * torch.linalg.vector_norm(jac, dim=-1)
        rates = losses / initial[0]
        target = (per_task.mean() * (rates / rates.mean()) ** alpha).detach()
        (grad,) = torch.autograd.grad((per_task - target).abs().sum(), scale)
        stepped = (w - lr * grad).clamp(min=0)  # jdoptim's guard (it acts on this trajectory)
        w = _M * stepped / stepped.sum()
        return expected[-1] @ jac

    steps = _trajectory(libmtl, 12)  # enough for alpha * 1.05 to flip a sign of N - c
    weighting, aggregator = GradNormWeighting(alpha=alpha, lr=lr), GradNorm(alpha=alpha, lr=lr)
    for (losses, jac), ref in zip(steps, expected, strict=True):
        weighting.observe_losses(losses)
        aggregator.observe_losses(losses)
        torch.testing.assert_close(weighting(jac @ jac.T), ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(aggregator(jac), ref @ jac, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(weighting(jac @ jac.T), w, rtol=1e-12, atol=1e-14)  # the last update
    assert not torch.allclose(expected[-1], torch.ones(_M, dtype=_F64))  # the weights moved
