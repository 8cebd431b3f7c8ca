"""GEM's episodic memory: ``n_memories`` slots for every task, kept as uint8 images on the model's device.

This is not a rehearsal buffer. Its examples never enter a training batch; GEM only uses them to compute
one gradient per past task, the constraints of the projection. The budget is per task, as in the paper
(a LibContinual ``buffer_size`` is a single budget shared by all classes of a replay method).
"""

from __future__ import annotations

import torch


def herding_selection(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` examples whose running feature mean tracks the class mean best (Welling 2009;
    iCaRL's exemplar selection). ``features`` are L2-normalised rows of one class."""
    count = min(count, len(features))
    target = features.mean(0)
    chosen = torch.zeros(count, dtype=torch.long, device=features.device)
    taken = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    running = torch.zeros_like(target)
    for k in range(count):
        gap = ((target - (running + features) / (k + 1)) ** 2).sum(1)
        pick = gap.masked_fill(taken, torch.inf).argmin()
        chosen[k] = pick
        taken[pick] = True
        running = running + features[pick]
    return chosen


def herd_by_class(features: torch.Tensor, labels: torch.Tensor, quotas: dict[int, int]) -> dict[int, torch.Tensor]:
    """For every class c in ``quotas``: positions (rows of ``features``) of its ``quotas[c]`` herded examples,
    in herding order, so that keeping a prefix keeps the best-tracking ones."""
    chosen = {}
    for c, quota in quotas.items():
        members = torch.nonzero(labels == c).flatten()
        chosen[c] = members[herding_selection(features[members], quota)]
    return chosen


def per_class_quota(total: int, classes: int) -> list[int]:
    """Split ``total`` slots over ``classes`` as evenly as possible (earlier classes take the remainder)."""
    return [total // classes + (1 if c < total % classes else 0) for c in range(classes)]


class EpisodicMemory:
    """``images[k, :count[k]]`` and ``labels[k, :count[k]]`` are task k's memory."""

    def __init__(self, num_tasks: int, n_memories: int, image_shape: tuple[int, ...], device: torch.device) -> None:
        self.n_memories = n_memories
        self.images = torch.zeros((num_tasks, n_memories, *image_shape), dtype=torch.uint8, device=device)
        self.labels = torch.zeros((num_tasks, n_memories), dtype=torch.long, device=device)
        # The ring's write position lives on the device, so a step replayed from a CUDA graph advances it.
        # How many slots hold examples is a host integer (it sets the memory's shape) kept by count_written.
        self.cursor = torch.zeros(num_tasks, dtype=torch.long, device=device)
        self.count = [0] * num_tasks

    def write_ring(self, task: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The original GEM's policy: write examples as they stream, overwriting the oldest, so the memory
        ends holding the task's most recent ``n_memories`` examples. (The original code drops the part of a
        batch that crosses the end of the ring; here it wraps around.) Device work only: the caller reports
        the batch to ``count_written``."""
        n = self.n_memories
        if len(images) > n:
            images, labels = images[-n:], labels[-n:]
        slots = (self.cursor[task] + torch.arange(len(images), device=images.device)) % n
        self.images[task, slots] = images
        self.labels[task, slots] = labels
        self.cursor[task] = (self.cursor[task] + len(images)) % n

    def count_written(self, task: int, written: int) -> None:
        self.count[task] = min(self.n_memories, self.count[task] + written)

    def fill(self, task: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace task ``task``'s memory with the given (at most ``n_memories``) examples."""
        count = len(images)
        self.images[task, :count] = images
        self.labels[task, :count] = labels
        self.count[task] = count
        self.cursor[task] = count % self.n_memories

    def task(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[task, : self.count[task]], self.labels[task, : self.count[task]]

    def tasks(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All memories of tasks 0..upto-1, concatenated."""
        parts = [self.task(k) for k in range(upto)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def state_dict(self) -> dict[str, object]:
        return {"images": self.images, "labels": self.labels, "count": list(self.count), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.images.copy_(state["images"])  # type: ignore[arg-type]
        self.labels.copy_(state["labels"])  # type: ignore[arg-type]
        self.cursor.copy_(state["cursor"])  # type: ignore[arg-type]
        self.count = list(state["count"])  # type: ignore[call-overload]
