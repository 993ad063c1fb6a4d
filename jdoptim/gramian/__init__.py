r"""Gramian engines: from a vector of losses to :math:`G = J J^\top` and weighted gradients.

This is the first stage of a Jacobian-descent step (losses → **Gramian engine** → weighting →
weighted gradient → inner optimizer). See :class:`GramianEngine` for the interface and
:class:`JacobianEngine` for the default engine.

>>> import torch
>>> from jdoptim.gramian import JacobianEngine
>>> x = torch.tensor([1.0, 2.0], requires_grad=True)
>>> result = JacobianEngine().compute(torch.stack([x.sum(), (x**2).sum()]), [x])
>>> result.weighted_gradient(torch.tensor([1.0, 0.5]))
[tensor([2., 3.])]
"""

from ._base import GramianEngine, GramianResult
from ._generalized import to_generalized_gramian
from ._kernels import (
    accumulate_gram,
    accumulation_dtype,
    register_gram_kernel,
    register_linear_gram_kernel,
)
from ._registry import available_engines, register_engine, resolve_engine
from .jacobian import JacobianEngine, JacobianResult
from .layerwise import LayerwiseGramianEngine, LayerwiseResult
from .multitask import MultiTaskGramianEngine, MultiTaskResult

__all__ = [
    "GramianEngine",
    "GramianResult",
    "JacobianEngine",
    "JacobianResult",
    "LayerwiseGramianEngine",
    "LayerwiseResult",
    "MultiTaskGramianEngine",
    "MultiTaskResult",
    "accumulate_gram",
    "accumulation_dtype",
    "available_engines",
    "register_engine",
    "register_gram_kernel",
    "register_linear_gram_kernel",
    "resolve_engine",
    "to_generalized_gramian",
]
