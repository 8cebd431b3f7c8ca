"""The trainer: task -> epoch -> step for any method, with evaluation after every task.

An arm's whole state (network, optimizer, schedule, method state such as GEM's memory, every RNG, the
position in the task/epoch/step loop and the metrics so far) is one dict, written atomically to the
run's checkpoint folder at the end of every task and every ``checkpoint_every`` epochs, so an interrupted
arm continues exactly where it stopped. The same file is an artifact of the run (``checkpoints/last.pt``)
until the arm finishes: the record carries it, so the arm also continues on another machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.config.experiment import ArmRecipe, Block, EngineOptions
from harness.data.augment import BatchTransform
from harness.data.split import Split
from harness.engine.evaluate import Evaluator
from harness.engine.graphs import GraphedStep
from harness.engine.optim import build_optimizer, build_scheduler, lr_to_device
from harness.engine.precision import choose_compile, choose_precision, native_bf16
from harness.engine.progress import Progress
from harness.errors import Interrupted, TrainingDiverged, UserError
from harness.methods import method_class
from harness.methods.base import Batch, Context, StepResult
from harness.metrics import old_new_accuracy, seen_accuracy, summarize
from harness.models import build_network, convolutional
from harness.tracking import Run

CHECKPOINT = "last.pt"
CHECKPOINTS = "checkpoints"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"engine.device is {name!r} but this machine has no CUDA device")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], folder: Path) -> Path:
    """Write atomically: the previous checkpoint stays in place until the new file is complete."""
    path = folder / CHECKPOINT
    tmp = folder / f".{CHECKPOINT}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise UserError(f"{folder}: checkpoint folder is not writable ({exc.strerror or exc})") from None
    return path


def progress_key(checkpoint: dict[str, Any]) -> tuple[int, int, int]:
    """How far a checkpoint's loop had come: (task, epochs trained in all, step within the epoch)."""
    loop = checkpoint["loop"]
    return loop["task"], loop["global_epoch"], loop["step"]


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The arm's last checkpoint, loaded with ``weights_only=True`` (a bad file is reported, never run)."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle, zip and torch errors all mean the same to the user
        raise UserError(f"{path}: checkpoint cannot be loaded safely ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None


@dataclass
class ArmResult:
    matrices: dict[str, np.ndarray]
    baseline: dict[str, np.ndarray]
    sizes: np.ndarray
    summary: dict[str, float]


@dataclass
class LoopState:
    """Where the loop is and what it has measured; everything here goes into the checkpoint."""

    task: int = 0
    epoch: int = 0
    step: int = 0
    global_epoch: int = 0
    perm: torch.Tensor | None = None
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    rows: dict[str, list[list[float]]] = field(default_factory=dict)
    baseline: dict[str, list[float]] = field(default_factory=dict)
    task_metrics: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    task_seconds: float = 0.0


class StopSignal:
    """Turns SIGINT into a flag the loop checks after each step, so the step in flight completes."""

    def __init__(self) -> None:
        self.raised = False
        self.previous: Any = None

    def __enter__(self) -> StopSignal:
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self.previous = None
        return self

    def _handle(self, *_: Any) -> None:
        self.raised = True

    def __exit__(self, *_: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


EpochCallback = Callable[["ArmTrainer", int, int], None]


class ArmTrainer:
    """Trains one arm on a split. ``evaluate_on``: ``test`` (default) or ``val`` (held-out training data,
    for tuning); ``last_task``: stop after this task (task-0 objectives); ``on_epoch``: called after every
    epoch with (trainer, task, epoch), e.g. to report to an Optuna pruner."""

    def __init__(self, arm: ArmRecipe, split: Split, run: Run | None, progress: Progress | None = None, *,
                 evaluate_on: str = "test", last_task: int | None = None, on_epoch: EpochCallback | None = None,
                 checkpoint_dir: Path | None = None, on_checkpoint: Callable[[Path], None] | None = None) -> None:
        self.arm, self.split, self.run = arm, split, run
        self.progress = progress or Progress(0, enabled=False)
        self.last_task = split.num_tasks - 1 if last_task is None else last_task
        self.on_epoch, self.checkpoint_dir, self.on_checkpoint = on_epoch, checkpoint_dir, on_checkpoint
        engine: EngineOptions = arm.engine
        self.device = resolve_device(engine.device)
        seed_everything(engine.seed, engine.deterministic)
        native, conv = native_bf16(self.device), convolutional(arm.backbone.name)
        self.precision = choose_precision(engine.amp, engine.channels_last, self.device.type, native, conv)
        self.compiled = choose_compile(engine.compile, self.precision, self.device.type, native, conv)
        if self.precision.warning:
            self.progress.note(f"{arm.name}: {self.precision.warning}")
        dataset = split.dataset
        method_cls = method_class(arm.method.name)
        self.net = build_network(arm.backbone.name, arm.backbone.kwargs, dataset.image_shape,
                                 None if method_cls.owns_head else split.num_classes).to(self.device)
        if self.precision.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.compiled:
            self.net.backbone.compile()  # in place: parameter names, and so checkpoints, stay those of eager runs
        layout = self.precision.channels_last
        train_t = BatchTransform(arm.augment, dataset.mean, dataset.std, self.device, channels_last=layout)
        eval_t = BatchTransform(dataclasses.replace(arm.augment, crop=0, flip=False, brightness=0.0),
                                dataset.mean, dataset.std, self.device, channels_last=layout)
        self.ctx = Context(split, dataset.train_x.to(self.device), split.train_y.to(self.device), train_t, eval_t,
                           self.device, (arm.backbone.name, arm.backbone.kwargs))
        self.method = method_cls(self.net, arm.method.options, self.ctx)
        graphs = engine.cuda_graph if engine.cuda_graph is not None else self.device.type == "cuda"
        # Graph-ready (tensor learning rate, fused update) whenever capture may be tried; on a CPU that is
        # the very step a GPU would capture, run eagerly.
        blocker = None if self.method.graph_safe else self.method.graph_blocker
        self.graph_ready = bool(graphs) and blocker is None
        self.step = GraphedStep(self._step, arm.batch_size, self.device, enabled=bool(graphs), blocker=blocker,
                                note=self.progress.note)
        images, labels = (dataset.test_x, split.test_y) if evaluate_on == "test" else (dataset.train_x, split.train_y)
        self.evaluator = Evaluator(split, images, labels, evaluate_on, engine.eval_batch_size, self.device)
        # Validation accuracy is logged under val_ names, so it can never be read as a test result.
        self.eval_prefix = "" if evaluate_on == "test" else "val_"
        self.state = LoopState()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # -- per-task pieces -------------------------------------------------------------------------------
    def epochs_of(self, task: int) -> int:
        return self.arm.init_epoch if task == 0 else self.arm.epoch

    def _build_optimizer(self, task: int) -> None:
        opt_block: Block = self.arm.init_optimizer if task == 0 else self.arm.optimizer
        sched_block: Block = self.arm.init_lr_scheduler if task == 0 else self.arm.lr_scheduler
        self.optimizer = build_optimizer(opt_block.name, opt_block.kwargs, self.method.optimizer_params(self.arm.to_dict()),
                                         graph_ready=self.graph_ready, device=self.device)
        self.scheduler = build_scheduler(self.optimizer, sched_block.options, self.arm.warmup)

    def _batch(self, index: torch.Tensor) -> Batch:
        images = self.ctx.train_images[index]
        return Batch(images, self.ctx.train_transform(images, train=True), self.ctx.train_labels[index])

    def _step(self, index: torch.Tensor) -> StepResult:
        """One optimisation step on the examples ``index``: what ``self.step`` runs eagerly or captures."""
        # autocast's weight cache would keep tensors made during capture alive across replays: off for graphs.
        with self.precision.autocast(self.device, cache_enabled=not self.step.enabled):
            return self.method.observe(self._batch(index), self.optimizer)

    def evaluate(self, trained: int) -> dict[str, np.ndarray]:
        """Accuracy rows after task ``trained``, in the arm's precision (bf16 inference where it trains in bf16)."""
        with self.precision.autocast(self.device):
            return self.evaluator.accuracy_rows(self.method, trained)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    # -- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "loop": dataclasses.asdict(s),
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "method": self.method.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        for key, value in checkpoint["loop"].items():
            setattr(self.state, key, value)
        self.net.load_state_dict(checkpoint["net"])
        self.method.resume_task(self.state.task)
        self.method.load_state_dict(_to_device(checkpoint["method"], self.device))
        if checkpoint["optimizer"] is not None:
            self._build_optimizer(self.state.task)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            lr_to_device(self.optimizer, self.device)
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])

    def checkpoint(self, *, boundary: bool = False) -> None:
        """Write the arm's state; ``boundary``: between tasks. A method whose state_dict does not capture
        everything (``Method.resumable``) is only checkpointed between tasks, so a resume restarts its task.
        ``on_checkpoint`` gets each new file (the runner copies it into the run's artifacts)."""
        if self.checkpoint_dir is not None and (boundary or self.method.resumable):
            path = save_checkpoint(self.state_dict(), self.checkpoint_dir)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path)

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self, checkpoint: dict[str, Any] | None = None) -> ArmResult:
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
            if not self.method.resumable:
                self.progress.note(f"{self.arm.name}: the method's state_dict does not hold all of its state: task "
                                   f"{self.state.task} restarts from its first epoch, and state it kept outside "
                                   "state_dict in earlier tasks is not restored")
        s = self.state
        if not s.baseline:
            s.baseline = {k: v.tolist() for k, v in self.evaluate(-1).items()}
        with StopSignal() as stop:
            while s.task <= self.last_task:
                self._train_task(s.task, stop)
        return self.result()

    def _count_time(self, since: float) -> float:
        """Add the time since ``since`` to the arm's and the task's totals; returns now."""
        now = time.monotonic()
        self.state.seconds += now - since
        self.state.task_seconds += now - since
        return now

    def _train_task(self, task: int, stop: StopSignal) -> None:
        s = self.state
        mark = time.monotonic()
        self.step.reset()
        if s.epoch == 0 and s.step == 0 and s.perm is None:
            self.method.before_task(task)
            self._build_optimizer(task)
        indices = self.method.training_indices(task).to(self.device)
        epochs = self.epochs_of(task)
        while s.epoch < epochs:
            self._train_epoch(task, indices, stop)
            mark = self._count_time(mark)
            every = self.arm.engine.checkpoint_every
            if every and s.epoch % every == 0 and s.epoch < epochs:
                self.checkpoint()
        with self.precision.autocast(self.device):  # memory selection and class means: inference passes
            self.method.after_task(task)
        rows = self.evaluate(task)
        for name, row in rows.items():
            s.rows.setdefault(name, []).append(row.tolist())
        for name, value in self.method.task_metrics().items():
            s.task_metrics.setdefault(name, []).append(value)
        self._count_time(mark)
        self._log_task(task, rows, s.task_seconds)
        s.task, s.epoch, s.task_seconds = task + 1, 0, 0.0
        self.checkpoint(boundary=True)

    def _train_epoch(self, task: int, indices: torch.Tensor, stop: StopSignal) -> None:
        s = self.state
        self.method.net.train()  # the method's whole model: a method may add modules around the network
        if s.perm is None:
            s.perm = indices[torch.randperm(len(indices), device="cpu").to(self.device)]
            s.step, s.loss_sum, s.correct, s.seen = 0, 0.0, 0, 0
        bs = self.arm.batch_size
        steps = math.ceil(len(s.perm) / bs)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        first_bad = torch.full((), steps, device=self.device, dtype=torch.long)
        start_step, seen = s.step, 0
        for step in range(start_step, steps):
            index = s.perm[step * bs : (step + 1) * bs]
            self.method.count_step(len(index))
            result = self.step(index)
            self.progress.step(len(index))
            loss = result.loss.double()
            # Accumulated on the device and read once per epoch: no host synchronisation per step.
            first_bad = torch.where(torch.isfinite(loss) | (first_bad < steps), first_bad, step)
            loss_sum += loss * len(index)
            correct += result.correct
            seen += len(index)
            if stop.raised and step + 1 < steps:
                s.step, s.loss_sum = step + 1, s.loss_sum + float(loss_sum)
                s.correct, s.seen = s.correct + int(correct), s.seen + seen
                self.checkpoint()
                raise Interrupted(f"{self.arm.name}: interrupted in task {task} epoch {s.epoch} after step {step}")
        if int(first_bad) < steps:
            raise TrainingDiverged(f"arm {self.arm.name!r}: non-finite loss at task {task}, epoch {s.epoch}, "
                                   f"step {int(first_bad)}; the last good checkpoint is kept")
        total_loss, total_correct, total_seen = s.loss_sum + float(loss_sum), s.correct + int(correct), s.seen + seen
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        # Epoch-level metrics carry "epoch_" in their name: their step counts epochs, a per-task metric's tasks.
        self._log({"epoch_train_loss": total_loss / max(total_seen, 1),
                   "epoch_train_acc": total_correct / max(total_seen, 1), "epoch_lr": lr}, s.global_epoch)
        self.progress.epoch(self.arm.name, task, self.last_task + 1, s.epoch, self.epochs_of(task),
                            total_loss / max(total_seen, 1), total_correct / max(total_seen, 1), lr)
        s.perm, s.step, s.loss_sum, s.correct, s.seen = None, 0, 0.0, 0, 0
        s.epoch += 1
        s.global_epoch += 1
        if self.on_epoch is not None:  # before a stop, so the checkpoint follows everything the epoch reported
            self.on_epoch(self, task, s.epoch - 1)
        if stop.raised:
            self.checkpoint()
            raise Interrupted(f"{self.arm.name}: interrupted in task {task} after epoch {s.epoch}")

    def _log_task(self, task: int, rows: dict[str, np.ndarray], seconds: float) -> None:
        sizes = self.evaluator.sizes
        metrics: dict[str, float] = {"task_seconds": seconds}
        for name, row in rows.items():
            key = f"{self.eval_prefix}{name}"
            metrics.update({f"{key}_acc_task_{j}": float(v) for j, v in enumerate(row)})
            R = np.array(self.state.rows[name])
            seen = seen_accuracy(R, sizes)
            old, new = old_new_accuracy(R, sizes)
            metrics.update({f"{key}_seen_acc": seen[-1], f"{key}_old_acc": old[-1], f"{key}_new_acc": new[-1]})
        for name, values in self.state.task_metrics.items():
            metrics[name] = values[-1]
        metrics["graph_replays"] = self.step.replays
        self._log(metrics, task)
        if self.run is not None:
            self.run.set_tags({"cuda_graph": self.step.mode})

    def result(self) -> ArmResult:
        s, sizes = self.state, self.evaluator.sizes
        n = len(s.rows["cil"])
        matrices = {name: np.array(rows)[:, :n] for name, rows in s.rows.items()}
        # NME has no class means before training, so its FWT baseline is unknown (NaN).
        baseline = {name: np.array(s.baseline[name])[:n] if name in s.baseline else np.full(n, np.nan)
                    for name in matrices}
        summary: dict[str, float] = {"task0_acc": float(matrices["cil"][0, 0]), "wall_seconds": s.seconds}
        for name, R in matrices.items():
            summary.update(summarize(R, baseline[name], sizes[:n], name))
        return ArmResult(matrices, baseline, sizes[:n], summary)


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_device(v, device) for v in tree]
    return tree
