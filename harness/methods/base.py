"""The method interface every arm implements; the trainer knows nothing else about an arm.

A method sees one task at a time: ``training_indices`` says which examples the trainer streams,
``observe`` performs one optimisation step on an augmented batch, ``after_task`` updates method state,
``predict`` returns class scores for evaluation (``cnn`` logits, plus e.g. ``nme``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from harness.data.augment import BatchTransform
from harness.data.split import Split

TrainMask = Literal["task", "seen", "none"]


@dataclass
class Batch:
    """``images``: raw uint8 as stored; ``inputs``: augmented, normalised network input; ``labels``:
    remapped labels (``split.bounds[t]`` is task t's label range)."""

    images: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor


@dataclass
class Context:
    """What a method may use besides its network: the split, the device-resident training images, the
    train/eval transforms, and the arm's backbone (name and kwargs) for methods that build more networks."""

    split: Split
    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_transform: BatchTransform
    eval_transform: BatchTransform
    device: torch.device
    backbone: tuple[str, dict[str, Any]] = ("mlp", {})


def restrict_logits(logits: torch.Tensor, lo: int | torch.Tensor, hi: int | torch.Tensor) -> torch.Tensor:
    """Hide the classes outside ``[lo, hi)`` (per example when ``lo``/``hi`` are tensors): a loss or argmax
    over the result sees only those logits, and hidden classes get exactly zero gradient."""
    classes = torch.arange(logits.shape[1], device=logits.device)
    # Integer bounds stay Python scalars: turning them into device tensors would copy from the host,
    # which a CUDA graph cannot capture.
    lo = lo.reshape(-1, 1) if isinstance(lo, torch.Tensor) else lo
    hi = hi.reshape(-1, 1) if isinstance(hi, torch.Tensor) else hi
    return logits.masked_fill((classes < lo) | (classes >= hi), float("-inf"))


def mask_bounds(mask: TrainMask, task: int, current: int, split: Split) -> tuple[int, int]:
    """Logit range a loss on task ``task``'s data sees while training task ``current``.

    ``task``: only that task's own classes (the original GEM and PyCIL); ``seen``: every class seen so far
    (class-incremental training); ``none``: all classes of the split."""
    if mask == "task":
        return split.bounds[task]
    if mask == "seen":
        return 0, split.seen_classes(current)
    return 0, split.num_classes


def per_task_labels(inputs: torch.Tensor, tasks: torch.Tensor, split: Split,
                    logits_of: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Task-incremental predictions for methods with task-specific parts: each example's logits from
    ``logits_of(its inputs, its task)``, argmax within its task's classes."""
    labels = torch.empty(len(inputs), dtype=torch.long, device=inputs.device)
    for t in tasks.unique().tolist():
        rows = tasks == t
        lo, hi = split.bounds[t]
        labels[rows] = logits_of(inputs[rows], t)[:, lo:hi].argmax(1) + lo
    return labels


@dataclass
class StepResult:
    loss: torch.Tensor
    correct: torch.Tensor


class Method:
    """Base class: plain cross-entropy on the current task's batch with the chosen logit mask.

    ``observe`` may be captured in a CUDA graph and replayed (``harness.engine.graphs``), which runs its
    kernels but none of its Python. So ``observe`` only enqueues device work, with shapes fixed for the task,
    on tensors it updates in place; host bookkeeping belongs in ``count_step``. Only a method that declares
    ``graph_safe`` is captured (the replay-contract test checks each one); any other runs eagerly, and may
    say why in ``graph_blocker``."""

    name: ClassVar[str]
    # Capabilities, read by the config, the report and the trainer (set by each method class):
    protocols: ClassVar[tuple[str, ...]] = ("class_incremental", "permutations", "rotations")
    uses_buffer: ClassVar[bool] = False  # mixes a rehearsal buffer into training batches
    episodic_memory: ClassVar[bool] = False  # keeps GEM-style per-task memories that never enter a batch
    libcontinual_name: ClassVar[str | None] = None  # the LibContinual ``classifier: {name}`` it answers to
    metric_columns: ClassVar[tuple[str, ...]] = ()  # summary metrics the comparison table adds for it
    graph_safe: ClassVar[bool] = False  # observe keeps to device work: a CUDA graph may capture it
    graph_blocker: ClassVar[str] = "the method does not declare graph_safe"
    owns_head: ClassVar[bool] = False  # builds its own classifier on the backbone: the network gets no head

    @dataclass
    class Options:
        train_mask: TrainMask = "seen"

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        self.net, self.options, self.ctx = net, options, ctx
        self.task = 0

    @staticmethod
    def training_tasks(task: int) -> list[int]:
        """Whose training data the trainer streams while task ``task`` is learned (also used by --dry-run)."""
        return [task]

    def training_indices(self, task: int) -> torch.Tensor:
        return torch.cat([self.ctx.split.tasks[k].train for k in self.training_tasks(task)])

    def before_task(self, task: int) -> None:
        self.task = task

    def resume_task(self, task: int) -> None:
        """Prepare to continue task ``task`` from a checkpoint, before ``load_state_dict``: allocate what the
        task needs, but leave the network and anything the checkpoint restores alone. The default is
        ``before_task``; a method whose ``before_task`` changes weights or draws new state overrides it."""
        self.before_task(task)

    def bounds(self, data_task: int) -> tuple[int, int]:
        return mask_bounds(self.options.train_mask, data_task, self.task, self.ctx.split)

    def loss_and_correct(self, inputs: torch.Tensor, labels: torch.Tensor, data_task: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = restrict_logits(self.net(inputs), *self.bounds(data_task))
        loss = nn.functional.cross_entropy(logits, labels)
        return loss, (logits.argmax(1) == labels).sum()

    def count_step(self, batch_size: int) -> None:
        """Host-side bookkeeping for the step about to run (called for every step, replayed or eager)."""

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        optimizer.zero_grad(set_to_none=False)
        loss, correct = self.loss_and_correct(batch.inputs, batch.labels, self.task)
        loss.backward()
        optimizer.step()
        return StepResult(loss.detach(), correct)

    def after_task(self, task: int) -> None:
        """Update method state once the task's training ends (memories, class means)."""

    def optimizer_params(self, recipe: dict[str, Any]) -> Any:
        """What the optimizer updates (parameters or param groups); ``recipe`` is the arm's resolved recipe."""
        return self.net.parameters()

    @property
    def resumable(self) -> bool:
        """Whether ``state_dict`` captures all the method's state, so that a resume mid-task is exact."""
        return True

    def provenance(self) -> dict[str, Any]:
        """Source files to record with the run (name -> path); methods of this repository need none."""
        return {}

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per predictor (``cnn``, ``nme``...): class scores [N, classes], or predicted labels [N]."""
        return {"cnn": self.net(inputs)}

    @torch.no_grad()
    def predict_til(self, inputs: torch.Tensor, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Task-incremental predicted labels, for predictors whose ``predict`` gives labels rather than
        scores (scores are restricted to each example's task by the evaluator instead). ``tasks``: each
        example's task index."""
        return {}

    def task_metrics(self) -> dict[str, float]:
        """Method-specific numbers for the task just trained (read once per task)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (for resume)."""
