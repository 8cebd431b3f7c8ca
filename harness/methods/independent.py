"""The GEM paper's "independent" baseline: one smaller network per task.

Each task t trains its own network, 1/T of the arm's width (MLP hidden units / T, ResNet ``nf`` / T), so
the T networks together have about the parameters of one. As the original code's run script does
(``--finetune yes``), each new task's network starts as a copy of the previous task's. Nothing is shared,
so nothing is forgotten; the price is capacity and no transfer between tasks.

Evaluation uses the task descriptor, as the paper does: task-incremental predictions come from each
example's own task network. Class-incremental scores (no task given) come from the latest task's network.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from harness.methods.base import Batch, Context, Method, StepResult, per_task_labels, restrict_logits
from harness.methods.registry import register_method
from harness.models import build_network


def narrower(backbone: str, kwargs: dict[str, Any], divisor: int) -> dict[str, Any]:
    """The backbone's kwargs at 1/``divisor`` of its width (at least one unit)."""
    if backbone == "mlp":
        return {**kwargs, "hidden": [max(1, h // divisor) for h in kwargs.get("hidden") or [100, 100]]}
    if backbone in ("reduced_resnet18", "resnet18", "resnet34"):
        nf = kwargs.get("nf", 20 if backbone == "reduced_resnet18" else 64)
        return {**kwargs, "nf": max(1, nf // divisor)}
    raise ValueError(f"independent networks need a backbone with a width to divide (mlp, resnet18s), not {backbone}")


@register_method("independent")
class Independent(Method):
    owns_head = True
    graph_safe = True

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        super().__init__(net, options, ctx)
        name, kwargs = ctx.backbone
        split = ctx.split
        shape = split.dataset.image_shape
        self.nets = nn.ModuleList(build_network(name, narrower(name, kwargs, split.num_tasks), shape, split.num_classes)
                                  for _ in range(split.num_tasks)).to(ctx.device)
        self.net = self.nets

    def before_task(self, task: int) -> None:
        super().before_task(task)
        if task > 0:  # the original's --finetune yes: start from the previous task's network
            self.nets[task].load_state_dict(copy.deepcopy(self.nets[task - 1].state_dict()))

    def optimizer_params(self, recipe: dict[str, Any]) -> Any:
        return self.nets[self.task].parameters()

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        optimizer.zero_grad(set_to_none=False)
        logits = restrict_logits(self.nets[self.task](batch.inputs), *self.bounds(self.task))
        loss = nn.functional.cross_entropy(logits, batch.labels)
        loss.backward()
        optimizer.step()
        return StepResult(loss.detach(), (logits.argmax(1) == batch.labels).sum())

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cnn": self.nets[self.task](inputs)}

    @torch.no_grad()
    def predict_til(self, inputs: torch.Tensor, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cnn": per_task_labels(inputs, tasks, self.ctx.split, lambda x, t: self.nets[t](x))}

    def state_dict(self) -> dict[str, Any]:
        return {"nets": self.nets.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nets.load_state_dict(state["nets"])
