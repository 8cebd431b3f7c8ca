"""A PyCIL-style GEM, written here from PyCIL's documented behaviour (no PyCIL code is used).

What it does, as PyCIL's GEM does:
- Memory: 2,000 exemplars in total, chosen per class by herding on the current network's features; after
  task t every seen class keeps ``memory_size // classes seen`` of them (older classes drop the last-herded
  ones). Before each task the exemplars of every past task are passed once through the *training*
  transform (random crop, flip, jitter) and that single augmented copy is what every step uses.
- Task 0: plain cross-entropy over task 0's classes. Later tasks: the current loss sees only the current
  task's logits (old classes masked), and each past task's memory gradient only that task's logits.
- Projection: only if some ⟨g, g_k⟩ < 0 (checked on the host), the dual QP with γ = 0 and no ε solved by
  quadprog on the CPU, then g̃ = Gᵀv + g.
- Evaluation: argmax over all seen classes (CNN) plus NME over the exemplars (the harness's evaluator).
- The recipe (ResNet-32, 200/100 epochs, SGD 0.1 m 0.9, wd 5e-4 then 2e-4, MultiStepLR [60,120,170] then
  [30,60,80], batch 128, crop+flip+brightness 63/255) lives in the experiment file, not here.

Where it knowingly deviates from PyCIL, and why:
- One linear head over all classes with masked logits instead of PyCIL's growing head. The rows of a new
  task's classes are re-initialised (nn.Linear's default) when the task starts, so they start as fresh as
  PyCIL's newly added rows rather than shrunk by weight decay.
- A singular Gram matrix (duplicate or linearly dependent memory gradients) makes quadprog raise, which
  stops a PyCIL run. Here that step retries with ε = 1e-8 · max diag(GGᵀ) added to the diagonal and counts
  the retry (``pycil_gem_qp_retries``), so a multi-hour run does not die on it.
- NME class means are the plain means of the exemplars' normalised features (PyCIL also averages in their
  horizontally flipped copies).
- Exemplars are selected from the un-augmented images with the eval transform, as PyCIL's herding does,
  but the harness's on-device transform replaces torchvision's PIL pipeline (same operations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import quadprog
import torch
from torch import nn

from harness.config.options import opt
from harness.gem.memory import herd_by_class
from harness.gem.method import assign_flat_gradient, flat_gradient
from harness.methods.base import Batch, Context, Method, StepResult, restrict_logits
from harness.methods.nme import class_means, cnn_and_nme_scores, embed
from harness.methods.registry import register_method


def quadprog_projection(g: torch.Tensor, G: torch.Tensor, margin: float) -> tuple[torch.Tensor, bool]:
    """PyCIL/original-code style: solve the dual on the host with quadprog; (g̃, retried with ε)."""
    G_np = G.detach().double().cpu().numpy()
    g_np = g.detach().double().cpu().numpy()
    t = G_np.shape[0]
    gram = G_np @ G_np.T
    gram = 0.5 * (gram + gram.T)
    linear = -(G_np @ g_np)
    try:
        v = quadprog.solve_qp(gram, linear, np.eye(t), np.full(t, margin))[0]
        retried = False
    except ValueError:
        ridge = 1e-8 * max(float(np.diag(gram).max()), np.finfo(float).tiny)
        v = quadprog.solve_qp(gram + ridge * np.eye(t), linear, np.eye(t), np.full(t, margin))[0]
        retried = True
    projected = torch.from_numpy(v @ G_np + g_np).to(device=g.device, dtype=g.dtype)
    return projected, retried


@register_method("pycil_gem")
class PyCILGEM(Method):
    protocols = ("class_incremental",)  # per-class exemplars of a class-incremental split
    episodic_memory = True
    metric_columns = ("nme_cil_acc",)
    graph_blocker = "the PyCIL-style step checks the constraints and solves the QP on the host, as PyCIL does"

    @dataclass
    class Options:
        memory_size: int = opt(2000, lo=1)
        margin: float = opt(0.0, lo=0.0)

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        super().__init__(net, options, ctx)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.exemplars: dict[int, torch.Tensor] = {}  # class -> training indices, in herding order
        self.memory: list[tuple[torch.Tensor, torch.Tensor]] = []  # per past task: augmented inputs, labels
        self.means: torch.Tensor | None = None
        self.steps = self.projections = self.retries = 0

    def before_task(self, task: int) -> None:
        super().before_task(task)
        self.steps = self.projections = self.retries = 0
        lo, hi = self.ctx.split.bounds[task]
        fresh = nn.Linear(self.net.head.in_features, hi - lo).to(self.ctx.device)
        with torch.no_grad():
            self.net.head.weight[lo:hi] = fresh.weight
            self.net.head.bias[lo:hi] = fresh.bias
        self.memory = [self._augmented_memory(k) for k in range(task)]

    def resume_task(self, task: int) -> None:
        # The checkpoint holds the weights (new head rows included) and the augmented memory of this task.
        self.task = task

    def _augmented_memory(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task k's exemplars through the training transform, once for the whole task."""
        index = torch.cat([self.exemplars[c] for c in range(*self.ctx.split.bounds[k])])
        return self.ctx.train_transform(self.ctx.train_images[index], train=True), self.ctx.train_labels[index]

    def count_step(self, batch_size: int) -> None:
        self.steps += 1

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        past = []
        for k, (inputs, labels) in enumerate(self.memory):
            self.net.zero_grad(set_to_none=False)
            logits = restrict_logits(self.net(inputs), *self.ctx.split.bounds[k])
            nn.functional.cross_entropy(logits, labels).backward()
            past.append(flat_gradient(self.params).clone())
        optimizer.zero_grad(set_to_none=False)
        loss, correct = self.loss_and_correct(batch.inputs, batch.labels, self.task)
        loss.backward()
        if past:
            g, G = flat_gradient(self.params), torch.stack(past)
            if bool((G @ g < 0).any()):  # a host decision every step, as the reference does
                projected, retried = quadprog_projection(g, G, self.options.margin)
                assign_flat_gradient(self.params, projected)
                self.projections += 1
                self.retries += int(retried)
        optimizer.step()
        return StepResult(loss.detach(), correct)

    def bounds(self, data_task: int) -> tuple[int, int]:
        return self.ctx.split.bounds[data_task]

    def after_task(self, task: int) -> None:
        """Herd exemplars for the new classes and shrink the old classes to the new per-class quota."""
        quota = self.options.memory_size // self.ctx.split.seen_classes(task)
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:quota]
        index = self.ctx.split.tasks[task].train.to(self.ctx.device)
        feats = embed(self.net, self.ctx.train_images[index], self.ctx.eval_transform)
        herded = herd_by_class(feats, self.ctx.train_labels[index], dict.fromkeys(range(*self.ctx.split.bounds[task]), quota))
        self.exemplars.update({c: index[positions] for c, positions in herded.items()})
        every = torch.cat(list(self.exemplars.values()))
        self.means = class_means(self.net, self.ctx.train_images[every], self.ctx.train_labels[every],
                                 self.ctx.split.num_classes, self.ctx.eval_transform)

    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return cnn_and_nme_scores(self.net, inputs, self.means)

    def task_metrics(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"pycil_gem_projection_fraction": self.projections / steps, "pycil_gem_qp_retries": float(self.retries),
                "pycil_gem_exemplars": float(sum(len(v) for v in self.exemplars.values()))}

    def state_dict(self) -> dict[str, Any]:
        return {"exemplars": {str(c): v for c, v in self.exemplars.items()}, "means": self.means,
                "memory": [list(m) for m in self.memory], "counts": [self.steps, self.projections, self.retries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exemplars = {int(c): v for c, v in state["exemplars"].items()}
        self.means = state["means"]
        self.memory = [tuple(m) for m in state["memory"]]
        self.steps, self.projections, self.retries = state["counts"]
