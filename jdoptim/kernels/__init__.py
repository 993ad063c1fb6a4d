r"""Triton kernels for the Gramian engines (optional; torch is used wherever they cannot run).

* :func:`gram_accumulate`: :math:`G + J_p J_p^\top` for a Jacobian block, upper tiles only
  (mirrored), split over columns, any of float32/float16/bfloat16 read as is with float32
  accumulation (:mod:`jdoptim.kernels.gram`);
* :func:`linear_gram` / :func:`per_sample_linear_gram`: the fused per-sample Gramian of a linear
  layer from its inputs and output gradients, including the sequence form, without the
  ``(BT)^2`` intermediate products in memory (:mod:`jdoptim.kernels.per_sample_gram`).

Both are ``torch.library.triton_op`` s, so ``torch.compile`` traces them into the graph on CUDA.
They run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before Triton is
imported (slow; used to test their numerics without a GPU). Otherwise, or without Triton, the
functions compute the same values with torch.

:func:`enable` routes the engines' CUDA tensors to the kernels
(:func:`jdoptim.gramian.register_gram_kernel` for the Jacobian engine,
:func:`jdoptim.gramian.register_linear_gram_kernel` for the layer-wise engine's linear and
convolution layers); :func:`disable` restores torch. Opt-in: CPU tensors always use torch.

>>> from jdoptim import kernels
>>> kernels.enable() == kernels.HAS_TRITON
True
>>> kernels.disable()
"""

from __future__ import annotations

from ._common import HAS_TRITON, INTERPRET
from .gram import gram_accumulate, gram_accumulate_reference
from .per_sample_gram import linear_gram, linear_gram_reference, per_sample_linear_gram

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "disable",
    "enable",
    "gram_accumulate",
    "gram_accumulate_reference",
    "linear_gram",
    "linear_gram_reference",
    "per_sample_linear_gram",
]


def enable(device_type: str = "cuda") -> bool:
    """Route the Gram computations of the engines on ``device_type`` to the kernels; returns
    whether Triton is installed (nothing is registered without it).

    ``device_type="cpu"`` only makes sense under ``TRITON_INTERPRET=1`` (tests).
    """
    from ..gramian import register_gram_kernel, register_linear_gram_kernel

    if not HAS_TRITON:
        return False
    register_gram_kernel(device_type, gram_accumulate)
    register_linear_gram_kernel(device_type, linear_gram)
    return True


def disable(device_type: str = "cuda") -> None:
    """Undo :func:`enable`: torch computes the Gramians on ``device_type`` again."""
    from ..gramian import register_gram_kernel, register_linear_gram_kernel

    register_gram_kernel(device_type, None)
    register_linear_gram_kernel(device_type, None)
