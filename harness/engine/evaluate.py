"""Evaluation after each task: one pass over every task's test (or validation) examples.

Class-incremental (CIL) accuracy takes the argmax over every class seen so far; task-incremental (TIL)
accuracy takes it within the example's own task, as the original GEM evaluates. For a task not yet trained
(row i < j, used by FWT) the CIL argmax runs over the classes of tasks 0..j.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.data.split import Split
from harness.methods.base import Method, restrict_logits


class Evaluator:
    def __init__(self, split: Split, images: torch.Tensor, labels: torch.Tensor, which: str,
                 batch_size: int, device: torch.device) -> None:
        """``images``/``labels`` are the full arrays the split indexes (test arrays for ``which='test'``,
        train arrays for ``'val'``); only the examples of the split's tasks are copied to ``device``."""
        index = [getattr(task, which) for task in split.tasks]
        self.sizes = np.array([len(i) for i in index], dtype=np.float64)
        order = torch.cat(index)
        self.images = images[order].to(device)
        self.labels = labels[order].to(device)
        self.task = torch.repeat_interleave(torch.arange(len(index)), torch.tensor([len(i) for i in index])).to(device)
        self.lo = torch.tensor([b[0] for b in split.bounds], device=device)
        self.hi = torch.tensor([b[1] for b in split.bounds], device=device)
        self.seen = torch.tensor([split.seen_classes(t) for t in range(split.num_tasks)], device=device)
        self.batch_size = batch_size

    @torch.no_grad()
    def scores(self, method: Method) -> dict[str, torch.Tensor]:
        """Each predictor's scores (or predicted labels) over every example; ``<name>:til`` entries hold a
        predictor's task-incremental labels where the method gives them (``Method.predict_til``)."""
        net = method.net
        was_training = net.training
        net.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(self.images), self.batch_size):
            inputs = method.ctx.eval_transform(self.images[i : i + self.batch_size], train=False)
            for name, s in method.predict(inputs).items():
                parts.setdefault(name, []).append(s if s.dim() == 1 else s.float())
            for name, s in method.predict_til(inputs, self.task[i : i + self.batch_size]).items():
                parts.setdefault(f"{name}:til", []).append(s)
        net.train(was_training)
        return {name: torch.cat(p) for name, p in parts.items()}

    def _task_accuracy(self, correct: torch.Tensor) -> np.ndarray:
        hits = torch.zeros(len(self.sizes), device=correct.device).index_add_(0, self.task, correct.float())
        return hits.cpu().numpy() / np.maximum(self.sizes, 1)

    def accuracy_rows(self, method: Method, trained: int) -> dict[str, np.ndarray]:
        """Per predictor p: ``{p_prefix}cil`` and ``{p_prefix}til`` rows of accuracy on every task, with
        ``trained`` the index of the last task trained (-1 before any training)."""
        rows = {}
        everything = self.scores(method)
        for name, scores in everything.items():
            if name.endswith(":til"):
                continue
            prefix = "" if name == "cnn" else f"{name}_"
            horizon = torch.clamp(self.task, min=max(trained, 0))
            if scores.dim() == 1:  # predicted labels: the method's own decision rule, taken as it is
                cil = scores == self.labels
            else:
                cil = restrict_logits(scores, 0, self.seen[horizon]).argmax(1) == self.labels
            if f"{name}:til" in everything:  # the method's own task-aware predictions
                til = everything[f"{name}:til"] == self.labels
            elif scores.dim() == 2:
                til = restrict_logits(scores, self.lo[self.task], self.hi[self.task]).argmax(1) == self.labels
            else:
                til = None
            rows[f"{prefix}cil"] = self._task_accuracy(cil)
            rows[f"{prefix}til"] = self._task_accuracy(til) if til is not None else np.full(len(self.sizes), np.nan)
        return rows
