"""Optimizers and learning-rate schedules, rebuilt for every task.

Schedules are closed-form factors of the base learning rate per epoch (LambdaLR), so linear warmup simply
multiplies them: epoch e < warmup runs at (e + 1) / warmup of the scheduled rate, and milestones count
from the task's first epoch, warmup included.
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harness.config.options import opt

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
}


@dataclass
class Constant:
    def factor(self, epoch: int, base_lr: float) -> float:
        return 1.0


@dataclass
class StepLR:
    step_size: int = opt(30, lo=1)
    gamma: float = opt(0.1, lo=0.0)

    def factor(self, epoch: int, base_lr: float) -> float:
        return self.gamma ** (epoch // self.step_size)


@dataclass
class MultiStepLR:
    milestones: list[int] = opt([60, 120, 170])
    gamma: float = opt(0.1, lo=0.0)

    def factor(self, epoch: int, base_lr: float) -> float:
        return self.gamma ** bisect.bisect_right(sorted(self.milestones), epoch)


@dataclass
class CosineAnnealingLR:
    """torch's CosineAnnealingLR in closed form; ``eta_min`` is the absolute final learning rate."""

    T_max: int = opt(100, lo=1)
    eta_min: float = opt(0.0, lo=0.0)

    def factor(self, epoch: int, base_lr: float) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(epoch, self.T_max) / self.T_max))
        floor = self.eta_min / base_lr if base_lr > 0 else 0.0
        return floor + (1 - floor) * cosine


SCHEDULERS: dict[str, type] = {
    "Constant": Constant,
    "StepLR": StepLR,
    "MultiStepLR": MultiStepLR,
    "CosineAnnealingLR": CosineAnnealingLR,
    "CosineAnnealing": CosineAnnealingLR,
}


def build_optimizer(name: str, kwargs: dict[str, Any], params: Any, *, graph_ready: bool = False,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The named torch optimizer. ``graph_ready``: the learning rate is a tensor on ``device`` that the
    schedule fills in place, and the update is the fused kernel that reads it there, so a CUDA graph that
    captured ``step()`` follows the schedule (a float learning rate would be frozen into the graph)."""
    cls = OPTIMIZERS[name]
    if graph_ready:
        lr = kwargs.get("lr", inspect.signature(cls).parameters["lr"].default)
        kwargs = {**kwargs, "lr": torch.tensor(float(lr), device=device), "fused": True}
        if cls is not torch.optim.SGD and device is not None and device.type == "cuda":
            kwargs["capturable"] = True  # Adam's step counter must stay on the device too
    return cls(params, **kwargs)


def lr_to_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Loading a state dict replaces a tensor learning rate with the checkpoint's (CPU) copy: move it back."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].to(device)


def lr_factor(schedule: Any, warmup: int, base_lr: float) -> Callable[[int], float]:
    def factor(epoch: int) -> float:
        warm = (epoch + 1) / warmup if epoch < warmup else 1.0
        return warm * schedule.factor(epoch, base_lr)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Any, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    base_lr = float(optimizer.param_groups[0]["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup, base_lr))
