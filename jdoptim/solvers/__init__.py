"""Solvers for the small convex problems behind the weightings (dual-cone QP, simplex problems,
symmetric eigendecomposition), written to run with no host synchronisation."""

from ._eager_compile import set_eager_compilation

__all__ = ["set_eager_compilation"]
