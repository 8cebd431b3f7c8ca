"""GEM: the exact projection, the episodic memory, and the GEM / A-GEM methods."""

from harness.gem.qp import project_gradient, solve_dual

__all__ = ["project_gradient", "solve_dual"]
