"""Methods: the ``Method`` interface (``base``), the registry every method file registers itself in, and the
methods that need nothing beyond the interface."""

from __future__ import annotations

from harness.methods.registry import method_class, methods, register_method

__all__ = ["method_class", "methods", "register_method"]
