"""The upper bound: joint training on every task seen so far."""

from __future__ import annotations

import torch
from torch import nn

from harness.methods.base import Method, restrict_logits
from harness.methods.registry import register_method


@register_method("joint")
class Joint(Method):
    """Upper bound: when task t arrives, train on the data of every task 0..t."""

    libcontinual_name = "Joint"
    graph_safe = True

    @staticmethod
    def training_tasks(task: int) -> list[int]:
        return list(range(task + 1))

    def loss_and_correct(self, inputs: torch.Tensor, labels: torch.Tensor, data_task: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.options.train_mask != "task":
            return super().loss_and_correct(inputs, labels, data_task)
        logits = restrict_logits(self.net(inputs), *self.ctx.split.label_bounds(labels))
        return nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum()
