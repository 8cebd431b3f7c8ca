"""A PyCIL-style GEM, written here from PyCIL's documented behaviour (no PyCIL code is used).

It stands on its own: herding, exemplar means and NME, gradient flattening and the QP are this file's
own code, so a bug in the harness's GEM (``harness.gem``) cannot move both arms of a comparison together.
From the harness it takes only the shared plumbing: the split and data (through ``Context``), the trainer
contract (``Method``) and the backbone registry.

What it does, as PyCIL's GEM does:
- Network initialisation: He-normal (fan_out) convolutions, BatchNorm at weight 1 and bias 0, and the
  head rows of each new task's classes drawn Kaiming-uniform with zero bias (PyCIL's ``SimpleLinear``).
- Memory: 2,000 exemplars in total, chosen per class by herding on the current network's normalised
  features; after task t every seen class keeps ``memory_size // classes seen`` of them (older classes drop
  the last-herded ones). Before each task the exemplars of every past task are passed once through the
  *training* transform (random crop, flip, jitter) and that single augmented copy is what every step uses.
- Task 0: plain cross-entropy over task 0's classes. Later tasks: the current loss sees only the current
  task's logits (old classes masked), and each past task's memory gradient only that task's logits.
- Projection: only if some ⟨g, g_k⟩ < 0 (checked on the host), the dual QP with γ = 0 and no ε solved by
  quadprog on the CPU, then g̃ = Gᵀv + g.
- Evaluation: argmax over all seen classes (CNN) plus NME: the nearest class mean of the exemplars'
  normalised features.
- The recipe (ResNet-32, 200/100 epochs, SGD 0.1 m 0.9, wd 5e-4 then 2e-4, MultiStepLR [60,120,170] then
  [30,60,80], batch 128, crop+flip+brightness 63/255) lives in the experiment file, not here.

Where it knowingly deviates from PyCIL, and why:
- One linear head over all classes with masked logits instead of PyCIL's growing head; the rows of a new
  task's classes are re-drawn when the task starts, so they start as fresh as PyCIL's newly added rows.
- A singular Gram matrix (duplicate or linearly dependent memory gradients) makes quadprog raise, which
  stops a PyCIL run. Here that step retries with ε = 1e-8 · max diag(GGᵀ) added to the diagonal and counts
  the retry (``pycil_gem_qp_retries``), so a multi-hour run does not die on it.
- The harness's on-device transforms replace torchvision's PIL pipeline (the same operations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import quadprog
import torch
from torch import nn

from harness.config.options import opt
from harness.methods.base import Batch, Context, Method, StepResult, restrict_logits
from harness.methods.registry import register_method


def pycil_init(net: nn.Module) -> None:
    """He-normal (fan_out) convolutions, BatchNorm at (1, 0), as PyCIL's CIFAR ResNets initialise."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def new_class_rows(in_features: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and biases for ``count`` new classes, as PyCIL's ``SimpleLinear`` draws a fresh layer:
    Kaiming-uniform for a linear nonlinearity, zero bias."""
    weight = torch.empty(count, in_features, device=device)
    nn.init.kaiming_uniform_(weight, nonlinearity="linear")
    return weight, torch.zeros(count, device=device)


@torch.no_grad()
def normalized_features(net: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """L2-normalised backbone features (eval mode) of ready network inputs, as float64 numpy rows."""
    was_training = net.training
    net.eval()
    feats = torch.cat([net.features(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)])
    net.train(was_training)
    feats = feats.double().cpu().numpy()
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def herding(features: np.ndarray, count: int) -> list[int]:
    """Rows of ``features`` (one class, normalised) picked one at a time so that the mean of the picked
    rows stays closest to the class mean (iCaRL's herding, which PyCIL uses)."""
    target = features.mean(axis=0)
    picked: list[int] = []
    running = np.zeros_like(target)
    available = np.ones(len(features), dtype=bool)
    for k in range(1, min(count, len(features)) + 1):
        distance = np.linalg.norm(target - (running + features) / k, axis=1)
        distance[~available] = np.inf
        best = int(distance.argmin())
        picked.append(best)
        available[best] = False
        running += features[best]
    return picked


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """Every parameter's gradient copied into one vector (zeros where a parameter has none)."""
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                      for p in params])


def write_flat_grad(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def quadprog_projection(g: torch.Tensor, G: torch.Tensor, margin: float) -> tuple[torch.Tensor, bool]:
    """Solve GEM's dual on the host with quadprog: min ½vᵀGGᵀv + gᵀGᵀv s.t. v ≥ margin; g̃ = Gᵀv + g.
    Returns (g̃, whether the step had to retry with a tiny ridge on a singular GGᵀ)."""
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
        pycil_init(net)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.exemplars: dict[int, torch.Tensor] = {}  # class -> training indices, in herding order
        self.memory: list[tuple[torch.Tensor, torch.Tensor]] = []  # per past task: augmented inputs, labels
        self.means: torch.Tensor | None = None  # [classes, feat_dim], NaN rows for classes without exemplars
        self.steps = self.projections = self.retries = 0

    def before_task(self, task: int) -> None:
        super().before_task(task)
        self.steps = self.projections = self.retries = 0
        lo, hi = self.ctx.split.bounds[task]
        weight, bias = new_class_rows(self.net.head.in_features, hi - lo, self.ctx.device)
        with torch.no_grad():
            self.net.head.weight[lo:hi] = weight
            self.net.head.bias[lo:hi] = bias
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
            past.append(flat_grad(self.params))
        optimizer.zero_grad(set_to_none=False)
        logits = restrict_logits(self.net(batch.inputs), *self.ctx.split.bounds[self.task])
        loss = nn.functional.cross_entropy(logits, batch.labels)
        loss.backward()
        if past:
            g, G = flat_grad(self.params), torch.stack(past)
            if bool((G @ g < 0).any()):  # a host decision every step, as the reference does
                projected, retried = quadprog_projection(g, G, self.options.margin)
                write_flat_grad(self.params, projected)
                self.projections += 1
                self.retries += int(retried)
        optimizer.step()
        return StepResult(loss.detach(), (logits.argmax(1) == batch.labels).sum())

    def after_task(self, task: int) -> None:
        """Herd exemplars for the new classes, shrink the old classes to the new per-class quota, and
        recompute every class mean from its exemplars."""
        quota = self.options.memory_size // self.ctx.split.seen_classes(task)
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:quota]
        index = self.ctx.split.tasks[task].train.to(self.ctx.device)
        labels = self.ctx.train_labels[index]
        features = normalized_features(self.net, self.ctx.eval_transform(self.ctx.train_images[index], train=False))
        for c in range(*self.ctx.split.bounds[task]):
            members = torch.nonzero(labels == c).flatten()
            order = herding(features[members.cpu().numpy()], quota)
            self.exemplars[c] = index[members[order]]
        self.means = self._class_means()

    def _class_means(self) -> torch.Tensor:
        """Normalised mean of each class's normalised exemplar features (NaN rows: no exemplars yet)."""
        means = torch.full((self.ctx.split.num_classes, self.net.head.in_features), math.nan, dtype=torch.float64)
        for c, index in self.exemplars.items():
            feats = normalized_features(self.net, self.ctx.eval_transform(self.ctx.train_images[index], train=False))
            mean = feats.mean(axis=0)
            means[c] = torch.from_numpy(mean / max(np.linalg.norm(mean), 1e-12))
        return means.float().to(self.ctx.device)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net.features(inputs)
        scores = {"cnn": self.net.head(features)}
        if self.means is not None:  # NME: nearer class mean, higher score; classes without a mean never win
            feats = nn.functional.normalize(features.float(), dim=1)
            scores["nme"] = (-torch.cdist(feats, self.means.nan_to_num(0.0))).masked_fill(
                self.means.isnan().any(1)[None, :], -math.inf)
        return scores

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
