"""The lower bound: plain fine-tuning, task after task (the GEM paper's "single")."""

from __future__ import annotations

from harness.methods.base import Method
from harness.methods.registry import register_method


@register_method("finetune")
class Finetune(Method):
    """Lower bound: train on each new task as it comes, no memory."""

    libcontinual_name = "Finetune"
    graph_safe = True
