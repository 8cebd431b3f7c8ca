"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), as the GEM paper's baseline runs it.

When task k ends, its diagonal Fisher F_k is estimated from the squared gradient of the loss on the task's
first ``n_memories`` training examples, and the weights θ*_k are kept. Every later step adds the penalty

    strength · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²

to the loss, pulling each weight back in proportion to how much past tasks' losses depend on it. The run
script's settings: MNIST permutations lr 0.1, 10 examples, strength 3; rotations lr 0.01, 1,000 examples,
strength 1,000; CIFAR-100 lr 1.0, 10 examples, strength 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.config.options import opt
from harness.methods.base import Batch, Context, Method, StepResult, TrainMask
from harness.methods.registry import register_method


@register_method("ewc")
class EWC(Method):
    libcontinual_name = "EWC"
    graph_safe = True

    @dataclass
    class Options:
        strength: float = opt(3.0, lo=0.0)
        n_memories: int = opt(10, lo=1)
        train_mask: TrainMask = "task"

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        super().__init__(net, options, ctx)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.fisher: list[list[torch.Tensor]] = []  # per finished task, per parameter
        self.anchors: list[list[torch.Tensor]] = []

    def penalty(self) -> torch.Tensor:
        """strength · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²; zero before any task has finished."""
        total = torch.zeros((), device=self.ctx.device)
        for fisher, anchor in zip(self.fisher, self.anchors, strict=True):
            for p, f, a in zip(self.params, fisher, anchor, strict=True):
                total = total + (f * (p - a) ** 2).sum()
        return self.options.strength * total

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        optimizer.zero_grad(set_to_none=False)
        loss, correct = self.loss_and_correct(batch.inputs, batch.labels, self.task)
        (loss + self.penalty()).backward()
        optimizer.step()
        return StepResult(loss.detach(), correct)

    def after_task(self, task: int) -> None:
        """F_task: squared gradient of the loss on the task's first n_memories examples; θ*_task: the weights."""
        index = self.ctx.split.tasks[task].train[: self.options.n_memories].to(self.ctx.device)
        inputs = self.ctx.eval_transform(self.ctx.train_images[index], train=False)
        self.net.zero_grad(set_to_none=False)
        with torch.autocast(self.ctx.device.type, enabled=False):  # the Fisher in fp32
            loss, _ = self.loss_and_correct(inputs.float(), self.ctx.train_labels[index], task)
            loss.backward()
        self.fisher.append([p.grad.detach().clone() ** 2 for p in self.params])
        self.anchors.append([p.detach().clone() for p in self.params])
        self.net.zero_grad(set_to_none=False)

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchors = state["fisher"], state["anchors"]
