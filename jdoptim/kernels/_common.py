"""Shared helpers of the Triton kernels: availability, interpreter mode, launch decisions."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether ``triton`` is importable (the kernels need it; everything falls back to torch)."""

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether Triton runs in interpreter mode (read at import: ``triton.jit`` reads it then too).
In that mode the kernels run, slowly, on CPU tensors: used to test their numerics on CPU."""

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the kernels read (they accumulate in float32)."""


def launchable(*tensors: Tensor) -> bool:
    """Whether the Triton kernels can run on ``tensors``: Triton is installed and the tensors
    are CUDA tensors, or CPU tensors in interpreter mode.

    >>> import torch
    >>> launchable(torch.zeros(2)) == (HAS_TRITON and INTERPRET)
    True
    """
    if not HAS_TRITON:
        return False
    device_types = {t.device.type for t in tensors}
    if len(device_types) != 1:
        return False
    device_type = device_types.pop()
    return device_type == "cuda" or (INTERPRET and device_type == "cpu")


def ieee_fp32() -> bool:
    """Whether float32 products must be exact float32 (no TF32): follows torch's own setting
    (``torch.set_float32_matmul_precision``), so the kernels agree with ``torch.mm``.

    >>> isinstance(ieee_fp32(), bool)
    True
    """
    return torch.get_float32_matmul_precision() == "highest"


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``).

    >>> [next_pow2(k) for k in (1, 2, 3, 17)]
    [1, 2, 4, 32]
    """
    return 1 << (max(n, 1) - 1).bit_length()


def upcast_bf16(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast ``dtype`` operands to float32 before ``tl.dot``: bfloat16
    in interpreter mode, whose ``tl.dot`` mishandles bfloat16 (Triton 3.9). Exact either way:
    a product of two bfloat16 numbers is exact in float32, and the GPU accumulates in float32.

    >>> upcast_bf16(torch.float16)
    False
    """
    return INTERPRET and dtype == torch.bfloat16
