"""Class-incremental splits shared by every arm of an experiment.

Labels are remapped to positions in the class order (task ``t`` owns the contiguous label range
``offsets[t]:offsets[t+1]``), as PyCIL and LibContinual do; the split hash covers labels and pixels of
every task's train, validation and test sets, so identical splits are checkable across MLflow runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.data.datasets import ImageDataset


def class_order(spec: str | list[int], num_classes: int) -> list[int]:
    """``label`` = 0..N-1 (the original GEM); ``seed:S`` = ``np.random.seed(S); np.random.permutation(N)``
    (PyCIL, S = 1993); or an explicit list of dataset class indices."""
    if isinstance(spec, list):
        return list(spec)
    if spec == "label":
        return list(range(num_classes))
    seed = int(spec.split(":", 1)[1])
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def task_offsets(init_cls_num: int, inc_cls_num: int, task_num: int) -> list[int]:
    return [0] + [init_cls_num + inc_cls_num * t for t in range(task_num)]


@dataclass
class TaskData:
    """One task's examples as indices into the dataset's train or test arrays."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


CLASS_INCREMENTAL = "class_incremental"


@dataclass
class Split:
    """Tasks of a split. In the class-incremental protocol task t owns the labels ``offsets[t]:offsets[t+1]``;
    in the domain-incremental protocols (``permutations``, ``rotations``) every task has every class and
    tasks differ by how their inputs are transformed."""

    dataset: ImageDataset
    order: list[int]
    offsets: list[int]
    tasks: list[TaskData]
    train_y: torch.Tensor
    test_y: torch.Tensor
    digest: str
    protocol: str = CLASS_INCREMENTAL
    _edges: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return self.offsets[-1]

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """The label range each task's examples belong to (its own logits, for task masks and TIL)."""
        if self.protocol == CLASS_INCREMENTAL:
            return [(self.offsets[t], self.offsets[t + 1]) for t in range(self.num_tasks)]
        return [(0, self.num_classes)] * self.num_tasks

    def seen_classes(self, t: int) -> int:
        """Labels 0..n-1 are the classes seen once task t has been trained."""
        return self.offsets[t + 1] if self.protocol == CLASS_INCREMENTAL else self.num_classes

    def label_bounds(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example, the label range of the task its label belongs to."""
        edges = self._edges.get(labels.device)
        if edges is None:  # made once per device: a host-to-device copy inside a CUDA graph is not allowed
            edges = torch.tensor(self.offsets if self.protocol == CLASS_INCREMENTAL else [0, self.num_classes],
                                 device=labels.device)
            self._edges[labels.device] = edges
        owner = torch.bucketize(labels, edges[1:], right=True)
        return edges[owner], edges[owner + 1]

    def task_classes(self, t: int) -> list[int]:
        """Dataset class indices of task ``t``."""
        lo, hi = self.bounds[t]
        return self.order[lo:hi]


def _remap(labels: torch.Tensor, order: list[int], size: int) -> torch.Tensor:
    table = torch.full((size,), -1, dtype=torch.int64)
    table[torch.tensor(order)] = torch.arange(len(order))
    return table[labels]


def _holdout(indices: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``fraction`` of each class's training examples for validation (never the test set)."""
    if fraction <= 0:
        return indices, indices[:0]
    rng = np.random.RandomState(seed)
    val = []
    for c in labels[indices].unique().tolist():
        members = indices[labels[indices] == c].numpy()
        val.append(np.sort(rng.choice(members, size=max(1, round(len(members) * fraction)), replace=False)))
    val_idx = torch.from_numpy(np.concatenate(val))
    keep = ~torch.isin(indices, val_idx)
    return indices[keep], torch.sort(val_idx).values


def _digest(dataset: ImageDataset, order: list[int], offsets: list[int], tasks: list[TaskData],
            train_y: torch.Tensor, test_y: torch.Tensor) -> str:
    h = hashlib.sha256(f"{dataset.name}|{order[: offsets[-1]]}|{offsets}".encode())
    for task in tasks:
        for x, y, idx in ((dataset.train_x, train_y, task.train), (dataset.train_x, train_y, task.val),
                          (dataset.test_x, test_y, task.test)):
            h.update(y[idx].numpy().tobytes())
            h.update(x[idx].numpy().tobytes())
    return h.hexdigest()[:16]


def _cap(indices: torch.Tensor, labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """At most ``count`` examples of each class, drawn with ``seed``, in their original order."""
    rng = np.random.RandomState(seed)
    keep = []
    for c in labels[indices].unique().tolist():
        members = indices[labels[indices] == c].numpy()
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return torch.sort(torch.from_numpy(np.concatenate(keep))).values if keep else indices


def make_split(dataset: ImageDataset, order: list[int], offsets: list[int], *, val_fraction: float = 0.0,
               seed: int = 0, protocol: str = CLASS_INCREMENTAL,
               blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None, max_per_class: int | None = None) -> Split:
    """Build every task's train/val/test indices; training indices keep the dataset's original order.

    Class-incremental tasks take the examples of their label range; domain-incremental tasks take the
    given ``blocks`` (per task: train indices, test indices). ``max_per_class`` keeps at most that many
    training and a fifth as many test examples of each class in each task (smoke runs)."""
    size = max(int(dataset.train_y.max()), int(dataset.test_y.max()), max(order)) + 1
    train_y, test_y = _remap(dataset.train_y, order, size), _remap(dataset.test_y, order, size)
    tasks = []
    for t in range(len(offsets) - 1):
        if blocks is not None:
            train, test = blocks[t]
        else:
            lo, hi = offsets[t], offsets[t + 1]
            train = torch.nonzero((train_y >= lo) & (train_y < hi)).flatten()
            test = torch.nonzero((test_y >= lo) & (test_y < hi)).flatten()
        if max_per_class is not None:
            train = _cap(train, train_y, max_per_class, seed + t)
            test = _cap(test, test_y, max(1, max_per_class // 5), seed + t)
        train, val = _holdout(train, train_y, val_fraction, seed + t)
        tasks.append(TaskData(train, val, test))
    digest = _digest(dataset, order, offsets, tasks, train_y, test_y)
    return Split(dataset, order, offsets, tasks, train_y, test_y, digest, protocol)
