"""Methods register themselves by name: ``@register_method("gem")`` on a ``Method`` subclass.

Adding a method is one file in one of ``METHOD_PACKAGES``; the experiment files, the LibContinual
``classifier:`` mapping, the dry-run plan and the comparison table all read the class and its
capabilities (``Method.protocols``, ``uses_buffer``, ``episodic_memory``, ``libcontinual_name``,
``metric_columns``, ``graph_safe``) from here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from harness.methods.base import Method

M = TypeVar("M", bound="type[Method]")
METHOD_PACKAGES = ("harness.methods", "harness.gem", "baselines")
_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make the method available to experiment files as ``method: {name: NAME}``."""
    def register(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice ({_REGISTRY[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def methods() -> dict[str, type[Method]]:
    """Every registered method, by name (the modules of METHOD_PACKAGES are imported once, so each file
    registers what it defines)."""
    for package in METHOD_PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            importlib.import_module(f"{package}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type[Method]:
    return methods()[name]
