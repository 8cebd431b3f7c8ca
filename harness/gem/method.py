"""The harness's GEM arm (Lopez-Paz & Ranzato 2017) and A-GEM (Chaudhry et al. 2019).

Per step, GEM computes g, the gradient of the current batch's loss, and g_k, the gradient of the loss on
all of task k's episodic memory, for every past task k. If some ⟨g, g_k⟩ < 0 the update would increase a
past task's loss, and g is replaced by the closest g̃ that satisfies every constraint (``harness.gem.qp``).
A-GEM relaxes the t constraints to one: the average gradient g_ref on a random sample of all memories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from harness.config.options import opt
from harness.gem.memory import EpisodicMemory, herd_by_class, per_class_quota
from harness.gem.qp import gradient_projection
from harness.methods.base import Batch, Context, Method, StepResult, TrainMask, restrict_logits
from harness.methods.nme import class_means, cnn_and_nme_scores, embed
from harness.methods.registry import register_method

MemoryFill = Literal["ring", "random", "herding"]


@dataclass
class MemoryOptions:
    """What GEM and A-GEM share: the per-task memory, how it is filled, and the logit mask."""

    n_memories: int = opt(256, lo=1)
    train_mask: TrainMask = "task"
    memory_fill: MemoryFill = "ring"
    augment_memory: bool = False


def flat_gradient(params: list[nn.Parameter]) -> torch.Tensor:
    """All parameter gradients as one vector [p] (the space in which GEM's constraints live)."""
    return torch.cat([p.grad.reshape(-1) for p in params])


def assign_flat_gradient(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


class EpisodicMethod(Method):
    """Shared by GEM and A-GEM: the per-task memory, how it is filled, and NME evaluation over it."""

    episodic_memory = True
    metric_columns = ("nme_cil_acc",)
    graph_safe = True

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        super().__init__(net, options, ctx)
        split = ctx.split
        self.memory = EpisodicMemory(split.num_tasks, options.n_memories, split.dataset.image_shape, ctx.device)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.means: torch.Tensor | None = None
        self.steps = 0
        self.projections = torch.zeros((), device=ctx.device)

    def before_task(self, task: int) -> None:
        super().before_task(task)
        self.steps = 0
        self.projections = torch.zeros((), device=self.ctx.device)

    def memory_inputs(self, images: torch.Tensor) -> torch.Tensor:
        # The original GEM replays memories un-augmented; augmenting them is an option, not the default.
        return self.ctx.train_transform(images, train=self.options.augment_memory)

    def count_step(self, batch_size: int) -> None:
        self.steps += 1
        if self.options.memory_fill == "ring":
            self.memory.count_written(self.task, batch_size)

    def remember(self, batch: Batch) -> None:
        if self.options.memory_fill == "ring":
            self.memory.write_ring(self.task, batch.images, batch.labels)

    def after_task(self, task: int) -> None:
        if self.options.memory_fill != "ring":
            self.memory.fill(task, *self.select_memories(task))
        images, labels = self.memory.tasks(task + 1)
        self.means = class_means(self.net, images, labels, self.ctx.split.num_classes, self.ctx.eval_transform)

    def select_memories(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``random``: a uniform sample of the task; ``herding``: per class, the examples whose mean
        feature best tracks the class mean, the slots split evenly over the task's classes."""
        idx = self.ctx.split.tasks[task].train.to(self.ctx.device)
        images, labels = self.ctx.train_images[idx], self.ctx.train_labels[idx]
        n = self.memory.n_memories
        if self.options.memory_fill == "random":
            keep = torch.randperm(len(idx), device=idx.device)[:n]
            return images[keep], labels[keep]
        classes = labels.unique().tolist()
        quotas = dict(zip(classes, per_class_quota(n, len(classes)), strict=True))
        chosen = torch.cat(list(herd_by_class(embed(self.net, images, self.ctx.eval_transform), labels, quotas).values()))
        return images[chosen], labels[chosen]

    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return cnn_and_nme_scores(self.net, inputs, self.means)

    def task_metrics(self) -> dict[str, float]:
        return {f"{self.name}_projection_fraction": float(self.projections) / max(self.steps, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "means": self.means, "steps": self.steps,
                "projections": self.projections}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.means = state["means"]
        self.steps, self.projections = state["steps"], state["projections"]


@register_method("gem")
class GEM(EpisodicMethod):
    """Gradient Episodic Memory; defaults are the original code's (ring memory, γ = 0.5, ε = 1e-3)."""

    libcontinual_name = "GEM"

    @dataclass
    class Options(MemoryOptions):
        memory_strength: float = opt(0.5, lo=0.0)
        eps: float = opt(1e-3, lo=0.0)

    def before_task(self, task: int) -> None:
        super().before_task(task)
        size = sum(p.numel() for p in self.params)
        self.past_gradients = torch.zeros(task, size, device=self.ctx.device)
        self.unconverged = torch.zeros((), device=self.ctx.device)

    def memory_gradient(self, k: int) -> torch.Tensor:
        """g_k: gradient of the loss on all of task k's memory (logits as the train mask dictates)."""
        self.net.zero_grad(set_to_none=False)
        images, labels = self.memory.task(k)
        logits = restrict_logits(self.net(self.memory_inputs(images)), *self.bounds(k))
        nn.functional.cross_entropy(logits, labels).backward()
        return flat_gradient(self.params)

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        self.remember(batch)
        for k in range(self.task):
            self.past_gradients[k] = self.memory_gradient(k)
        optimizer.zero_grad(set_to_none=False)
        loss, correct = self.loss_and_correct(batch.inputs, batch.labels, self.task)
        loss.backward()
        if self.task > 0:
            g = flat_gradient(self.params)
            projected, violated, converged = gradient_projection(
                g, self.past_gradients, self.options.memory_strength, self.options.eps)
            assign_flat_gradient(self.params, projected)
            self.projections += violated
            self.unconverged += ~converged
        optimizer.step()
        return StepResult(loss.detach(), correct)

    def task_metrics(self) -> dict[str, float]:
        return {**super().task_metrics(), "gem_qp_unconverged": float(self.unconverged)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unconverged": self.unconverged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.unconverged = state["unconverged"]


@register_method("agem")
class AGEM(EpisodicMethod):
    """Averaged GEM: one constraint, from a random ``sample_size`` drawn from all past memories."""

    libcontinual_name = "AGEM"

    @dataclass
    class Options(MemoryOptions):
        sample_size: int = opt(256, lo=1)

    def reference_gradient(self) -> torch.Tensor:
        """g_ref: gradient of the loss on a random sample of every past task's memory."""
        images, labels = self.memory.tasks(self.task)
        pick = torch.randperm(len(images), device=images.device)[: self.options.sample_size]
        images, labels = images[pick], labels[pick]
        if self.options.train_mask == "task":
            lo, hi = self.ctx.split.label_bounds(labels)
        else:
            lo, hi = self.bounds(self.task)
        self.net.zero_grad(set_to_none=False)
        logits = restrict_logits(self.net(self.memory_inputs(images)), lo, hi)
        nn.functional.cross_entropy(logits, labels).backward()
        return flat_gradient(self.params)

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        self.remember(batch)
        g_ref = self.reference_gradient() if self.task > 0 else None
        optimizer.zero_grad(set_to_none=False)
        loss, correct = self.loss_and_correct(batch.inputs, batch.labels, self.task)
        loss.backward()
        if g_ref is not None:
            g = flat_gradient(self.params)
            dot = g @ g_ref
            violated = dot < 0
            # g̃ = g − (gᵀg_ref / g_refᵀg_ref) g_ref, only when the update would raise the memory loss
            projected = g - (dot / (g_ref @ g_ref).clamp_min(torch.finfo(g.dtype).tiny)) * g_ref
            assign_flat_gradient(self.params, torch.where(violated, projected, g))
            self.projections += violated
        optimizer.step()
        return StepResult(loss.detach(), correct)
