"""Float64 torch.linalg reference implementations (host-syncing, exact) for the eigen-based
methods, used to check the sync-free versions."""

from __future__ import annotations

import torch
from torch import Tensor


def imtlg_ref(G: Tensor, eps: float) -> Tensor:
    G = G.double()
    d = G.diagonal().sqrt()
    v = torch.linalg.pinv(G, rtol=G.shape[0] * eps) @ d
    total = v.sum()
    return torch.zeros_like(v) if abs(float(total)) < 1e-12 else v / total


def aligned_mtl_ref(G: Tensor, p: Tensor, scale_mode: str, eps: float) -> Tensor:
    G, p = G.double(), p.double()
    m = G.shape[0]
    vals, vecs = torch.linalg.eigh(G)
    tol = float(vals.max().detach()) * m * eps
    r = int((vals > tol).sum())
    if r == 0:
        return p
    vals, vecs = vals.flip(0)[:r], vecs.flip(1)[:, :r]
    s = {"min": vals.min(), "median": vals.median(), "rmse": vals.mean()}[scale_mode]
    return s.sqrt() * vecs @ torch.diag(vals.rsqrt()) @ vecs.T @ p


def config_ref(J: Tensor, p: Tensor, rtol: float) -> Tensor:
    J, p = J.double(), p.double()
    units = torch.nan_to_num(J / J.norm(dim=1, keepdim=True), 0.0)
    b = torch.linalg.pinv(units, rtol=rtol) @ p
    u = torch.nn.functional.normalize(b, dim=0)
    return (J.sum(0) @ u) * u
