"""Method registry: every arm is a ``Method`` subclass found here by name."""

from __future__ import annotations

import importlib

from harness.methods.base import Method

METHODS = {
    "finetune": "harness.methods.base:Finetune",
    "joint": "harness.methods.base:Joint",
    "gem": "harness.gem.method:GEM",
    "agem": "harness.gem.method:AGEM",
    "pycil_gem": "baselines.pycil_gem:PyCILGEM",
}
# Methods that keep GEM's per-task episodic memory (and so reject a rehearsal buffer, and report NME).
EPISODIC_METHODS = ("gem", "agem", "pycil_gem")


def method_class(name: str) -> type[Method]:
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
