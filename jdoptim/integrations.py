r"""Helpers for training libraries that wrap the optimizer.

Hugging Face Accelerate's ``accelerator.prepare(model, optimizer)`` wraps a
:class:`~jdoptim.JDOptimizer` in an ``AcceleratedOptimizer``, whose ``step()`` takes no losses
and is skipped on the micro-batches of a gradient accumulation. The JD gradient is therefore
written by a separate backward, once per micro-batch, in place of
``accelerator.backward(loss)``: :func:`accelerate_backward`. The ``AcceleratedOptimizer``'s
``step()`` and ``zero_grad()`` then do what they do for any optimizer.

This module imports nothing from Accelerate: it reads the accelerator's
``gradient_accumulation_steps``, ``scaler`` and ``distributed_type`` attributes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .optimizer import JDOptimizer


def _unwrap(optimizer: Any) -> JDOptimizer:
    """The :class:`JDOptimizer` inside ``optimizer`` (itself, or wrapped by Accelerate's
    ``AcceleratedOptimizer`` / Lightning's ``LightningOptimizer``, which keep the wrapped one in
    ``.optimizer`` or ``._optimizer``)."""
    seen = 0
    while not isinstance(optimizer, JDOptimizer):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or seen > 8:
            raise TypeError(
                "`optimizer` should be a JDOptimizer, or a wrapper around one (Accelerate's "
                f"AcceleratedOptimizer). Found `{type(optimizer).__name__}`."
            )
        optimizer, seen = inner, seen + 1
    return optimizer


def accelerate_backward(
    accelerator: Any, optimizer: Any, losses: Tensor, *, retain_graph: bool = False
) -> Tensor | None:
    r"""``accelerator.backward(loss)`` for Jacobian descent on a tensor of ``losses``.

    Like Accelerate's own ``backward``, it divides the losses by
    ``accelerator.gradient_accumulation_steps`` :math:`K` (so that the accumulated ``.grad``
    is the mean of the micro-batches' JD directions, :math:`\frac1K \sum_k J_k^\top w_k`) and
    multiplies them by the loss scale of ``accelerator.scaler`` when there is one (fp16 mixed
    precision); then it calls :meth:`JDOptimizer.backward <jdoptim.JDOptimizer.backward>`.
    Call it once per micro-batch, inside ``accelerator.accumulate(model)``, and step through
    the prepared optimizer as usual.

    :param accelerator: an ``accelerate.Accelerator``.
    :param optimizer: the :class:`~jdoptim.JDOptimizer`, or the ``AcceleratedOptimizer`` that
        ``accelerator.prepare`` returned for it.
    :param losses: the losses of this micro-batch (any shape, as for ``backward``).
    :param retain_graph: as for :meth:`JDOptimizer.backward <jdoptim.JDOptimizer.backward>`.
    :returns: the weights (computed from the scaled losses, see ``backward``).
    :raises ValueError: with a loss scaler, unless ``optimizer.nonfinite == "propagate"``
        (the scaler detects overflows itself and skips the step; ``"raise"`` would raise on
        the first one).
    :raises NotImplementedError: under DeepSpeed, whose engine runs its own backward.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from jdoptim import JDOptimizer
    >>> from jdoptim.aggregation import MeanWeighting
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MeanWeighting())
    >>> accelerator = SimpleNamespace(gradient_accumulation_steps=4, scaler=None)  # stand-in
    >>> losses = (model(torch.randn(8, 3)) ** 2).mean(0)
    >>> expected = torch.autograd.grad(losses.mean() / 4, model.weight, retain_graph=True)[0]
    >>> accelerate_backward(accelerator, opt, losses)
    tensor([0.5000, 0.5000])
    >>> torch.allclose(model.weight.grad, expected)
    True
    """
    jd = _unwrap(optimizer)
    if str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED"):
        raise NotImplementedError(
            "accelerate_backward does not support DeepSpeed: its engine runs its own backward "
            "and step."
        )
    steps = accelerator.gradient_accumulation_steps
    if steps != 1:
        losses = losses / steps
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        if jd.nonfinite != "propagate":
            raise ValueError(
                "With a loss scaler (fp16 mixed precision), build the JDOptimizer with "
                f'nonfinite="propagate" (found {jd.nonfinite!r}): the scaler detects the '
                "overflows and skips those steps itself."
            )
        losses = scaler.scale(losses)
    return jd.backward(losses, retain_graph=retain_graph)
