"""The GEM paper's "multimodal" baseline: the single network with a dedicated input layer per task.

The paper: "the same architecture as single, but with a dedicated input layer per task (only for MNIST
datasets)". Task t's inputs go through its own first layer; every later layer and the output are shared.
(The original code adds that input layer in front of the single network's hidden layers; here it
replaces the MLP's first layer, so the network keeps the single arm's depth.)

The input layer is chosen by the task descriptor, at training and at test time; class-incremental scores
(no task given) use the latest task's input layer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from harness.methods.base import Batch, Context, Method, StepResult, per_task_labels, restrict_logits
from harness.methods.registry import register_method


@register_method("multimodal")
class Multimodal(Method):
    graph_safe = True

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        super().__init__(net, options, ctx)
        body = getattr(net.backbone, "body", None)
        if not isinstance(body, nn.Sequential) or not isinstance(body[1], nn.Linear):
            raise ValueError("multimodal needs the mlp backbone (a dedicated first linear layer per task)")
        first = body[1]
        # Every task's input layer starts as an independent draw of the arm's own first-layer initialisation.
        self.inputs = nn.ModuleList([first] + [self._fresh(first) for _ in range(ctx.split.num_tasks - 1)]).to(ctx.device)
        self.shared = nn.Sequential(*body[2:])
        self.model = nn.ModuleDict({"inputs": self.inputs, "shared": self.shared, "head": net.head})
        self.net = self.model

    @staticmethod
    def _fresh(layer: nn.Linear) -> nn.Linear:
        """A new layer of the same shape with the same kind of initialisation as ``layer``."""
        fresh = copy.deepcopy(layer)
        if layer.bias is not None and not bool(layer.bias.any()):  # zero biases: Xavier-style init
            nn.init.xavier_uniform_(fresh.weight)
        else:
            fresh.reset_parameters()
        return fresh

    def logits(self, inputs: torch.Tensor, task: int) -> torch.Tensor:
        hidden = torch.relu(self.inputs[task](inputs.flatten(1)))
        return self.model["head"](self.shared(hidden))

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        optimizer.zero_grad(set_to_none=False)
        logits = restrict_logits(self.logits(batch.inputs, self.task), *self.bounds(self.task))
        loss = nn.functional.cross_entropy(logits, batch.labels)
        loss.backward()
        optimizer.step()
        return StepResult(loss.detach(), (logits.argmax(1) == batch.labels).sum())

    def optimizer_params(self, recipe: dict[str, Any]) -> Any:
        return self.model.parameters()

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cnn": self.logits(inputs, self.task)}

    @torch.no_grad()
    def predict_til(self, inputs: torch.Tensor, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cnn": per_task_labels(inputs, tasks, self.ctx.split, self.logits)}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
