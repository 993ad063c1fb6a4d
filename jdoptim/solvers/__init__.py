"""Solvers for the small convex problems behind the weightings (dual-cone QP, simplex problems)."""
