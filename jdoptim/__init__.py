"""jdoptim: Jacobian descent as a drop-in, torch.compile-first PyTorch optimizer."""

from . import aggregation

__version__ = "0.1.0"

__all__ = ["aggregation", "__version__"]
