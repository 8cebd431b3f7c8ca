"""Running an experiment: every arm on the same split, each its own tracked run under one parent run."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from harness.config.experiment import ArmRecipe, Experiment
from harness.data.datasets import DATASETS, load_dataset
from harness.data.domains import expand_tasks
from harness.data.split import Split, class_order, make_split
from harness.engine.precision import choose_precision, native_bf16
from harness.engine.progress import Progress
from harness.engine.trainer import CHECKPOINT, CHECKPOINTS, ArmResult, ArmTrainer, load_checkpoint, progress_key, resolve_device
from harness.errors import Interrupted, TrackingUnavailable, UserError
from harness.methods import method_class
from harness.metrics import seen_accuracy
from harness.paths import run_work_dir
from harness.tracking import Run, Tracker
from harness.tracking.plots import accuracy_curves, comparison_figure, matrix_heatmap

TABLE_COLUMNS = ["task0_acc", "cil_acc", "cil_avg_incremental", "til_acc", "til_avg_incremental", "cil_bwt",
                 "til_bwt", "cil_forgetting", "wall_seconds"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_split(experiment: Experiment) -> Split:
    """Load the classes the tasks use and cut the split every arm shares."""
    spec = experiment.split
    order = class_order(spec.class_order, DATASETS[spec.dataset].num_classes)
    used = order[: spec.offsets[-1]]
    dataset = load_dataset(spec.dataset, spec.data_root, used)
    blocks = None
    if spec.protocol != "class_incremental":
        dataset, blocks = expand_tasks(dataset, spec.protocol, spec.task_num, spec.samples_per_task, spec.seed)
    return make_split(dataset, used, spec.offsets, val_fraction=spec.val_fraction, seed=spec.seed,
                      protocol=spec.protocol, blocks=blocks, max_per_class=spec.max_per_class)


def split_params(experiment: Experiment, split: Split) -> dict[str, Any]:
    spec = dataclasses.asdict(experiment.split)
    spec["data_root"] = str(spec["data_root"]) if spec["data_root"] else None
    spec["class_order_resolved"] = split.order
    spec["hash"] = split.digest
    return spec


def plan(experiment: Experiment, split: Split) -> str:
    """What a run would do: each task's classes and, per arm, steps per epoch."""
    lines = [f"split {split.digest}: {split.dataset.name}, {split.num_tasks} tasks, {split.num_classes} classes"]
    for t, task in enumerate(split.tasks):
        lines.append(f"  task {t}: classes {split.task_classes(t)} ({len(task.train)} train, {len(task.val)} val, "
                     f"{len(task.test)} test)")
    for arm in experiment.arms:
        steps = [_epoch_steps(arm, split, t) for t in range(split.num_tasks)]
        epochs = [arm.init_epoch] + [arm.epoch] * (split.num_tasks - 1)
        lines.append(f"arm {arm.name} ({arm.method.name}, {arm.backbone.name}): steps/epoch per task {steps}, "
                     f"epochs per task {epochs}, {arm_steps(arm, split)} steps")
    return "\n".join(lines)


def arm_steps(arm: ArmRecipe, split: Split, last_task: int | None = None) -> int:
    """Optimisation steps one run of the arm takes (up to ``last_task``), for progress and the plan."""
    tasks = range(split.num_tasks if last_task is None else last_task + 1)
    return sum(_epoch_steps(arm, split, t) * (arm.init_epoch if t == 0 else arm.epoch) for t in tasks)


def steps_taken(arm: ArmRecipe, split: Split, checkpoint: dict[str, Any]) -> int:
    """Optimisation steps the run had taken when it wrote ``checkpoint``: what a resume does not run again."""
    loop = checkpoint["loop"]
    done = arm_steps(arm, split, loop["task"] - 1)  # the tasks before the checkpoint's (none for task 0)
    if loop["task"] < split.num_tasks:  # a checkpoint after the last task has no task in progress
        done += _epoch_steps(arm, split, loop["task"]) * loop["epoch"] + loop["step"]
    return done


def _epoch_steps(arm: ArmRecipe, split: Split, task: int) -> int:
    return -(-_train_count(arm, split, task) // arm.batch_size)


def _train_count(arm: ArmRecipe, split: Split, task: int) -> int:
    return sum(len(split.tasks[k].train) for k in method_class(arm.method.name).training_tasks(task))


@dataclass
class ArmOutcome:
    arm: str
    method: str
    run_id: str | None
    summary: dict[str, float]
    cil_curve: list[float]
    seed: int = 0
    first_task: list[float] = field(default_factory=list)  # TIL accuracy on task 0 after each task


def _log_artifacts(run: Run, arm: ArmRecipe, result: ArmResult, folder: Path) -> None:
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(arm.to_dict(), sort_keys=False))
    matrix = folder / "accuracy_matrix.json"
    matrix.write_text(json.dumps({name: R.tolist() for name, R in result.matrices.items()}))
    heat = matrix_heatmap({k: result.matrices[k] for k in ("cil", "til")}, f"{arm.name}: accuracy matrix",
                          folder / "accuracy_matrix.png")
    curves = {name: seen_accuracy(R, result.sizes) for name, R in result.matrices.items() if not name.endswith("til")}
    curve = accuracy_curves(curves, f"{arm.name}: accuracy after each task", folder / "accuracy_curve.png")
    for path in (recipe, matrix, heat, curve):
        run.log_artifact(path)


def run_name(arm: ArmRecipe, experiment: Experiment) -> str:
    """``arm``, or ``arm seed=N`` when the experiment runs several seeds."""
    return f"{arm.name} seed={arm.engine.seed}" if experiment.seeds and len(experiment.seeds) > 1 else arm.name


def resume_checkpoint(run: Run, arm: ArmRecipe, folder: Path, restart: bool) -> dict[str, Any] | None:
    """The interrupted run's checkpoint: the one in this machine's ``folder`` or the copy in the run's
    artifacts (a later session on a fresh machine, a clone of the record), whichever had come further. A
    missing one stops the resume unless ``restart`` (``--force``)."""
    found = [c for c in (load_checkpoint(folder),) if c is not None]
    with tempfile.TemporaryDirectory() as tmp:
        copy = run.tracker.download_artifact(run.run_id, f"{CHECKPOINTS}/{CHECKPOINT}", Path(tmp))
        if copy is not None:
            found.append(load_checkpoint(copy.parent))
    if not found and not restart:
        raise UserError(f"run {run.run_id} (arm {arm.name}, seed {arm.engine.seed}): no checkpoint at "
                        f"{folder / CHECKPOINT} nor in the run's artifacts ({CHECKPOINTS}/{CHECKPOINT}); pass "
                        "--force to restart this arm from its first task")
    return max(found, key=progress_key, default=None)


def recorded_precision(arm: ArmRecipe, tags: dict[str, str], *, only_auto: bool = False) -> ArmRecipe:
    """A resumed arm computes as it started: in the precision and memory layout its run recorded, whatever
    ``auto`` picks on the machine that resumes it (a run is never half bf16, half fp32). ``only_auto``: set
    only the switches the arm leaves at ``auto`` (an arm run that begins in a resumed experiment, ``tags``
    being how ``auto`` resolved where the experiment started)."""
    if "precision" not in tags:
        return arm
    recorded = {"amp": tags["precision"] != "fp32", "channels_last": tags.get("memory_format") == "channels_last"}
    engine = dataclasses.replace(arm.engine, **{k: v for k, v in recorded.items()
                                                if not only_auto or getattr(arm.engine, k) == "auto"})
    return dataclasses.replace(arm, engine=engine)


def auto_precision(device_name: str) -> dict[str, str]:
    """The ``precision`` and ``memory_format`` tags that ``auto`` resolves to on this machine for a
    convolutional backbone: what an experiment's parent records when it starts."""
    device = resolve_device(device_name)
    return choose_precision("auto", "auto", device.type, native_bf16(device), convolutional=True).tags


def cpu_capability() -> str:
    """The CPU's vector instruction set as PyTorch dispatches on it (``AVX2``, ``AVX512``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def run_arm(arm: ArmRecipe, experiment: Experiment, split: Split, tracker: Tracker, parent: Run,
            progress: Progress, *, resume_run: Run | None = None, restart: bool = False,
            auto_as: dict[str, str] | None = None) -> ArmOutcome:
    """Train one arm with one seed into its own run (a fresh one, or ``resume_run`` continued from its
    checkpoint; ``restart``: start ``resume_run`` over if its checkpoint is gone). ``auto_as``: the
    ``precision`` / ``memory_format`` that ``auto`` resolved to where a resumed experiment started; a fresh
    run computes so too, so an experiment that spans machines is never half bf16, half fp32.

    If the tracking server stops answering, the arm stops where it is. Its last checkpoint precedes
    everything that was not delivered (metrics reach the tracker before the checkpoint that follows them),
    so a resume from it logs them again and continues."""
    try:
        return _run_arm(arm, experiment, split, tracker, parent, progress, resume_run=resume_run, restart=restart,
                        auto_as=auto_as)
    except TrackingUnavailable as exc:
        progress.note(f"{arm.name}: stopped: {exc}")
        raise TrackingUnavailable(
            f"{exc}; arm {arm.name} seed {arm.engine.seed} stopped, its checkpoint stays in {run_work_dir('<run id>')}; "
            f"once the server answers: python -m harness.run --resume {parent.run_id} --tracking-uri {tracker.uri} "
            "delivers what is missing and continues") from None


def _run_arm(arm: ArmRecipe, experiment: Experiment, split: Split, tracker: Tracker, parent: Run,
             progress: Progress, *, resume_run: Run | None, restart: bool, auto_as: dict[str, str] | None) -> ArmOutcome:
    device = resolve_device(arm.engine.device)
    tags = {"arm": arm.name, "seed": arm.engine.seed, "method": arm.method.name, "device": _device_name(device),
            "git_commit": git_commit(), "split_hash": split.digest, "experiment": experiment.name}
    if device.type == "cpu" and resume_run is None:
        tags["cpu_capability"] = cpu_capability()
    folder = run_work_dir(resume_run.run_id) if resume_run is not None else None
    checkpoint = None
    if resume_run is None:
        run = tracker.start(run_name(arm, experiment), tags, parent=parent)
        run.log_params({"split": split_params(experiment, split), **arm.to_dict()})  # the recipe as written
        folder = run_work_dir(run.run_id)
        if auto_as is not None:
            arm = recorded_precision(arm, auto_as, only_auto=True)
    else:
        checkpoint = resume_checkpoint(resume_run, arm, folder / CHECKPOINTS, restart)
        if checkpoint is not None:
            progress.skip(steps_taken(arm, split, checkpoint))
        recorded = tracker.info(resume_run.run_id).tags
        arm = recorded_precision(arm, recorded)
        run = tracker.reopen(resume_run.run_id)
        capabilities = recorded.get("cpu_capability", "")
        if device.type == "cpu" and cpu_capability() not in capabilities.split(", "):
            tags["cpu_capability"] = ", ".join(filter(None, [capabilities, cpu_capability()]))
        run.set_tags({**tags, "resumed": "true"})
    checkpoints = folder / CHECKPOINTS
    run.set_tags({"resume_hint": f"python -m harness.run --resume {parent.run_id}", "checkpoint_dir": str(checkpoints)})
    log_path = folder / "arm.log"  # beside the checkpoints, appended to when the arm resumes
    folder.mkdir(parents=True, exist_ok=True)
    if resume_run is not None and not log_path.exists():  # resumed on another machine: the record's copy
        tracker.download_artifact(run.run_id, log_path.name, folder)
    with open(log_path, "a") as log:
        progress.log = log

        def carry(checkpoint: Path) -> None:
            """Until the arm finishes, its run's artifacts hold its checkpoint and log: the record alone
            resumes it (a later session on a fresh machine, a clone)."""
            log.flush()
            run.log_artifact(checkpoint, CHECKPOINTS)
            run.log_artifact(log_path)

        try:
            trainer = ArmTrainer(arm, split, run, progress, checkpoint_dir=checkpoints, on_checkpoint=carry)
            run.set_tags({**trainer.precision.tags, "compiled": str(trainer.compiled).lower()})
            if resume_run is None:
                record_source(run, tracker, arm.name, trainer.method.provenance())
            result = trainer.fit(checkpoint)
        except TrackingUnavailable:
            raise  # the server can take neither the log nor a status now
        except BaseException as exc:
            progress.note(f"{arm.name}: stopped: {exc}")
            log.flush()
            run.log_artifact(log_path)
            run.end("KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED")
            raise
        finally:
            progress.log = None
    run.log_metrics(result.summary)
    for name, values in trainer.state.task_metrics.items():
        run.log_metrics({f"{name}_mean": float(np.mean(values))})
    with tempfile.TemporaryDirectory() as tmp:
        _log_artifacts(run, arm, result, Path(tmp))
    run.log_artifact(log_path)
    tracker.delete_artifacts(run.run_id, CHECKPOINTS)  # finished: the local copy stays until the experiment ends
    run.end("FINISHED")
    curve = seen_accuracy(result.matrices["cil"], result.sizes).tolist()
    return ArmOutcome(arm.name, arm.method.name, run.run_id, result.summary, curve, arm.engine.seed,
                      result.matrices["til"][:, 0].tolist())


def record_source(run: Run, tracker: Tracker, arm: str, files: dict[str, Path]) -> None:
    """An imported method's source files under ``source/`` with their SHA-256 (``source/SHA256SUMS`` and the
    ``source_sha256`` tag), and ``source.diff``: what changed since the previous finished run of this arm."""
    if not files:
        return
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}\n" for name, p in files.items())
    previous = tracker.previous_arm_run(arm, run.run_id)
    old_sums = tracker.read_artifact(previous.run_id, "source/SHA256SUMS") if previous else None
    diff = []
    if previous is not None and old_sums is not None:
        names = sorted({line.split("  ", 1)[1] for line in old_sums.splitlines()} | set(files))
        for name in names:
            before = tracker.read_artifact(previous.run_id, f"source/{name}") or ""
            after = files[name].read_text() if name in files else ""
            diff += difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                         f"{previous.run_id[:8]}/{name}", f"{run.run_id[:8]}/{name}")
    with tempfile.TemporaryDirectory() as tmp:
        for path in files.values():
            run.log_artifact(path, "source")
        (Path(tmp) / "SHA256SUMS").write_text(sums)
        run.log_artifact(Path(tmp) / "SHA256SUMS", "source")
        if previous is not None:
            text = "".join(diff) or f"no change since run {previous.run_id}\n"
            (Path(tmp) / "source.diff").write_text(text)
            run.log_artifact(Path(tmp) / "source.diff")
    run.set_tags({"source_sha256": hashlib.sha256(sums.encode()).hexdigest(),
                  "source_changed": str(bool(diff)).lower() if previous is not None else "first run"})


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def table_columns(outcomes: list[ArmOutcome]) -> list[str]:
    """The shared columns, then those the arms' methods add (``Method.metric_columns``)."""
    extra = [c for o in outcomes for c in method_class(o.method).metric_columns]
    return [*TABLE_COLUMNS[:-1], *dict.fromkeys(extra), TABLE_COLUMNS[-1]]


def comparison_table(outcomes: list[ArmOutcome]) -> pd.DataFrame:
    """Per arm and metric: mean, sample std (ddof 1; NaN for one seed) and n over the arm's seeds."""
    wanted = table_columns(outcomes)
    rows = [{"arm": o.arm, "seed": o.seed, **{c: o.summary.get(c, np.nan) for c in wanted}} for o in outcomes]
    frame = pd.DataFrame(rows).dropna(axis=1, how="all")
    columns = [c for c in wanted if c in frame.columns]
    stats = frame.groupby("arm", sort=False)[columns].agg(["mean", "std", "count"])
    return stats.rename(columns={"count": "n"}, level=1)


def format_table(stats: pd.DataFrame) -> pd.DataFrame:
    """``mean ± std (n)`` strings, one column per metric."""
    def cell(mean: float, std: float, n: int) -> str:
        if np.isnan(mean):
            return "-"
        digits = 1 if abs(mean) >= 10 else 4
        spread = f" ± {std:.{digits}f}" if n > 1 else ""
        return f"{mean:.{digits}f}{spread} ({n})"

    metrics = stats.columns.get_level_values(0).unique()
    return pd.DataFrame({m: [cell(*row) for row in stats[m][["mean", "std", "n"]].itertuples(index=False)]
                         for m in metrics}, index=stats.index)


def log_parent_summary(parent: Run, outcomes: list[ArmOutcome]) -> pd.DataFrame:
    """The comparison on the parent run: ``<arm>.<metric>.mean`` / ``.std`` metrics (and ``.n``), the table as
    ``comparison.csv`` and every arm's CIL curve (first seed) in one plot; returns the printable table."""
    stats = comparison_table(outcomes)
    for arm, row in stats.iterrows():
        parent.log_metrics({f"{arm}.{metric}.{stat}": value for (metric, stat), value in row.items()})
    curves = {}
    for o in outcomes:
        if o.cil_curve and o.arm not in curves:
            curves[o.arm] = np.array(o.cil_curve)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "comparison.csv"
        stats.to_csv(csv)
        parent.log_artifact(csv)
        if curves:
            parent.log_artifact(accuracy_curves(curves, "CIL accuracy on seen tasks", Path(tmp) / "arms_cil.png"))
        if any(len(o.first_task) > 1 for o in outcomes):
            parent.log_artifact(paper_figure(outcomes, Path(tmp) / "comparison.png"))
    return format_table(stats)


def paper_figure(outcomes: list[ArmOutcome], path: Path) -> Path:
    """ACC / BWT / FWT (task-incremental, as the GEM paper reports them) per arm with their spread over
    seeds, and the first task's accuracy as tasks are learned."""
    stats, first = {}, {}
    for arm in dict.fromkeys(o.arm for o in outcomes):
        mine = [o for o in outcomes if o.arm == arm]
        stats[arm] = {}
        for label, key in (("ACC", "til_acc"), ("BWT", "til_bwt"), ("FWT", "til_fwt")):
            values = np.array([o.summary.get(key, np.nan) for o in mine], dtype=float)
            stats[arm][label] = (float(np.nanmean(values)) if np.isfinite(values).any() else 0.0,
                                 float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else 0.0)
        first[arm] = np.array([o.first_task for o in mine if o.first_task], dtype=float)
    seeds = len({o.seed for o in outcomes})
    return comparison_figure(stats, {a: r for a, r in first.items() if r.size},
                             f"task-incremental ACC / BWT / FWT, mean ± std over {seeds} seed(s)", path)
