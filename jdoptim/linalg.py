"""torchjd-compatible names of the dual-cone projectors (``torchjd.linalg`` in torchjd >= 0.11):
``from jdoptim.linalg import QuadprogProjector`` replaces ``from torchjd.linalg import
QuadprogProjector``. :class:`TorchProjector` is jdoptim's sync-free default."""

from .solvers.projectors import DualConeProjector, QuadprogProjector, TorchProjector

__all__ = ["DualConeProjector", "QuadprogProjector", "TorchProjector"]
