"""The loss-level path of :class:`jdoptim.JDOptimizer`: a :class:`~jdoptim.scalarization.
Scalarizer` instead of a weighting (one ordinary backward of the scalarized loss, no Gramian)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._functional import NonFiniteError, NonFinitePolicy
from .scalarization import Scalarizer


def attach_trainable_params(optimizer: torch.optim.Optimizer, scalarizer: Scalarizer) -> None:
    """Add the parameters of a trainable scalarizer (``UW``, ``IMTLL``) that ``optimizer`` does
    not hold yet as one new param group (the optimiser's defaults: same lr, betas, ...)."""
    if not scalarizer.trains_with_model:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in scalarizer.parameters() if p.requires_grad and id(p) not in held]
    if missing:
        optimizer.add_param_group({"params": missing})


def scalarized_backward(
    scalarizer: Scalarizer, losses: Tensor, nonfinite: NonFinitePolicy, retain_graph: bool
) -> bool:
    """Backward of ``scalarizer(losses)``; return ``True`` when the step must be skipped.

    With ``nonfinite`` ``"raise"``/``"skip"`` the scalarized loss is checked first (one host
    read), so a non-finite one leaves every ``.grad`` untouched; ``"propagate"`` reads nothing.
    """
    loss = scalarizer(losses)
    if nonfinite != "propagate" and not bool(torch.isfinite(loss)):
        if nonfinite == "raise":
            raise NonFiniteError(
                f"The scalarized loss ({scalarizer}) is NaN or inf; no gradient was written."
            )
        return True
    loss.backward(retain_graph=retain_graph)
    return False
