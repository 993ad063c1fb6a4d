"""jdoptim: Jacobian descent as a drop-in, torch.compile-first PyTorch optimizer."""

from . import aggregation, gramian
from ._compile import configure_compile
from ._functional import NonFiniteError, WeightingStrategy, jd_backward
from .optimizer import JDOptimizer

__version__ = "0.1.0"

__all__ = [
    "JDOptimizer",
    "NonFiniteError",
    "WeightingStrategy",
    "aggregation",
    "configure_compile",
    "gramian",
    "jd_backward",
    "__version__",
]
