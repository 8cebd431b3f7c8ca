"""iCaRL (Rebuffi et al. 2017), the GEM paper's CIFAR-100 baseline.

- Exemplars: a total budget of ``n_memories`` images, split evenly over the classes seen so far; when a
  task ends, each new class's exemplars are chosen by herding on normalised features, and old classes
  keep the prefix of theirs that fits the new quota.
- Training: cross-entropy on the current task's classes, plus distillation: for every past task, one
  random exemplar per class, whose logits over that task's classes are pulled towards the logits recorded
  when the exemplars were last updated (KL divergence, weight ``strength``, scaled by classes per task as
  the original code does).
- Prediction: nearest mean of exemplars (NME) on normalised features; the class means come from the
  exemplars only. The network's own logits are reported beside it.

The run script's CIFAR-100 settings: lr 1.0, 1,280 exemplars, strength 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.config.options import opt
from harness.gem.memory import herd_by_class, per_class_quota
from harness.methods.base import Batch, Context, Method, StepResult, restrict_logits
from harness.methods.nme import class_means, cnn_and_nme_scores, embed
from harness.methods.registry import register_method


@register_method("icarl")
class ICaRL(Method):
    protocols = ("class_incremental",)
    episodic_memory = True
    metric_columns = ("nme_cil_acc",)

    @dataclass
    class Options:
        n_memories: int = opt(1280, lo=1)
        strength: float = opt(1.0, lo=0.0)

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        super().__init__(net, options, ctx)
        self.exemplars: dict[int, torch.Tensor] = {}  # class -> training indices, in herding order
        self.targets: dict[int, torch.Tensor] = {}  # class -> recorded logits of its exemplars
        self.means: torch.Tensor | None = None

    def distillation(self) -> torch.Tensor:
        """KL(recorded ‖ current) over each past task's classes, one random exemplar per class."""
        total = torch.zeros((), device=self.ctx.device)
        for k in range(self.task):
            lo, hi = self.ctx.split.bounds[k]
            picks = [torch.randint(len(self.exemplars[c]), (1,), device=self.ctx.device) for c in range(lo, hi)]
            index = torch.cat([self.exemplars[c][i] for c, i in zip(range(lo, hi), picks, strict=True)])
            target = torch.cat([self.targets[c][i] for c, i in zip(range(lo, hi), picks, strict=True)])[:, lo:hi]
            inputs = self.ctx.eval_transform(self.ctx.train_images[index], train=False)
            current = nn.functional.log_softmax(self.net(inputs)[:, lo:hi].float(), dim=1)
            total = total + nn.functional.kl_div(current, nn.functional.softmax(target, dim=1), reduction="batchmean") \
                * (hi - lo)
        return self.options.strength * total

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        optimizer.zero_grad(set_to_none=False)
        logits = restrict_logits(self.net(batch.inputs), *self.ctx.split.bounds[self.task])
        loss = nn.functional.cross_entropy(logits, batch.labels)
        (loss + self.distillation()).backward()
        optimizer.step()
        return StepResult(loss.detach(), (logits.argmax(1) == batch.labels).sum())

    def after_task(self, task: int) -> None:
        """Shrink old classes to the new quota, herd the new classes, record logits and class means."""
        quota = self.options.n_memories // self.ctx.split.seen_classes(task)
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:quota]
        index = self.ctx.split.tasks[task].train.to(self.ctx.device)
        images, labels = self.ctx.train_images[index], self.ctx.train_labels[index]
        classes = list(range(*self.ctx.split.bounds[task]))
        quotas = dict(zip(classes, per_class_quota(quota * len(classes), len(classes)), strict=True))
        herded = herd_by_class(embed(self.net, images, self.ctx.eval_transform), labels, quotas)
        self.exemplars.update({c: index[rows] for c, rows in herded.items()})
        every = torch.cat(list(self.exemplars.values()))
        with torch.no_grad():
            was_training = self.net.training
            self.net.eval()
            for c, rows in self.exemplars.items():
                self.targets[c] = self.net(self.ctx.eval_transform(self.ctx.train_images[rows], train=False)).float()
            self.net.train(was_training)
        self.means = class_means(self.net, self.ctx.train_images[every], self.ctx.train_labels[every],
                                 self.ctx.split.num_classes, self.ctx.eval_transform)

    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return cnn_and_nme_scores(self.net, inputs, self.means)

    def state_dict(self) -> dict[str, Any]:
        return {"exemplars": {str(c): v for c, v in self.exemplars.items()},
                "targets": {str(c): v for c, v in self.targets.items()}, "means": self.means}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exemplars = {int(c): v for c, v in state["exemplars"].items()}
        self.targets = {int(c): v for c, v in state["targets"].items()}
        self.means = state["means"]
