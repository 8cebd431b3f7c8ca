"""An experiment session: every arm and seed of an experiment on one split, each its own tracked run under
one parent run, started fresh (``start``) or continued from an interrupted parent (``resume``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from harness.config.experiment import ArmRecipe, Experiment, load_experiment
from harness.data.split import Split
from harness.engine.progress import Progress
from harness.engine.runner import (
    ArmOutcome,
    arm_steps,
    auto_precision,
    build_split,
    git_commit,
    log_parent_summary,
    plan,
    run_arm,
    split_params,
)
from harness.errors import Interrupted, TrackingUnavailable, UserError
from harness.models import convolutional
from harness.paths import cache_dir, run_work_dir
from harness.tracking import VIEW, MlflowTracker, Run, RunInfo, Tracker, make_tracker

RESOLVED = "experiment_resolved.yaml"


def total_steps(experiment: Experiment, split: Split) -> int:
    return sum(arm_steps(arm, split) for arm in experiment.seeded_arms())


def _outcome_from_run(tracker: Tracker, info: RunInfo, arm: ArmRecipe) -> ArmOutcome:
    return ArmOutcome(arm.name, arm.method.name, info.run_id, info.metrics,
                      tracker.metric_history(info.run_id, "cil_seen_acc"), arm.engine.seed,
                      tracker.metric_history(info.run_id, "til_acc_task_0"))


def run_key(info: RunInfo) -> tuple[str, int]:
    """(arm, seed) of an arm's run; runs recorded before seeds were tags carry the seed as a parameter."""
    return info.tags.get("arm", info.name), int(info.tags.get("seed", info.params.get("engine.seed", 0)))


def execute(experiment: Experiment, split: Split, tracker: Tracker, parent: Run, progress: Progress,
            previous: dict[tuple[str, int], RunInfo] | None = None, restart: bool = False,
            auto_as: dict[str, str] | None = None) -> list[ArmOutcome]:
    """Run (or, on resume, finish) every arm and seed; the parent is marked KILLED/FAILED with a resume hint
    on error. ``auto_as``: how ``auto`` resolved where a resumed experiment started (``started_auto``)."""
    outcomes = []
    try:
        for arm in experiment.seeded_arms():
            before = (previous or {}).get((arm.name, arm.engine.seed))
            if before is not None and before.status == "FINISHED":
                progress.note(f"{before.name}: finished before, kept ({before.run_id})")
                progress.skip(arm_steps(arm, split))
                outcomes.append(_outcome_from_run(tracker, before, arm))
                continue
            resume_run = Run(tracker, before.run_id) if before is not None else None
            outcomes.append(run_arm(arm, experiment, split, tracker, parent, progress, resume_run=resume_run,
                                    restart=restart, auto_as=auto_as))
    except TrackingUnavailable:
        raise  # it names the resume command; the parent stays RUNNING until the server answers again
    except BaseException as exc:
        hint = f"python -m harness.run --resume {parent.run_id}"
        parent.set_tags({"resume_hint": hint})
        stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
        parent.end("KILLED" if stopped else "FAILED")
        if stopped:
            raise Interrupted(f"{exc or 'stopped'}; continue with: {hint}") from None
        raise
    finally:
        progress.close()
    table = log_parent_summary(parent, outcomes)
    parent.end("FINISHED")
    for outcome in outcomes:  # the experiment is complete: its runs' checkpoints leave the cache
        shutil.rmtree(run_work_dir(outcome.run_id), ignore_errors=True)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return outcomes


def describe(experiment: Experiment) -> str:
    """The file's ``description:``, else its opening comment block."""
    if experiment.raw.get("description"):
        return str(experiment.raw["description"])
    lines = []
    for line in Path(experiment.source).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return "\n".join(lines)


def only_arms(experiment: Experiment, names: str | None) -> Experiment:
    """The experiment restricted to the named arms (``--arms a,b``), in the file's order."""
    if not names:
        return experiment
    wanted = names.split(",")
    arms = [experiment.arm(name) for name in wanted]  # an unknown name is a UserError with did-you-mean
    return dataclasses.replace(experiment, arms=[a for a in experiment.arms if a in arms])


# A smoke run compiles nothing: compilation would take longer than the run it checks.
SMOKE = ["split.max_per_class=5", "arms.*.epoch=1", "arms.*.init_epoch=1", "arms.*.engine.compile=false"]
SMOKE_DOMAIN = ["split.samples_per_task=100"]
SMOKE_TASKS = 3


def smoke_overrides(experiment: Experiment) -> list[str]:
    """A run of every arm, metric and artifact on a small subset, with one seed: a broken experiment shows
    in a minute. At most 3 tasks, unless an arm's LibContinual method file fixes the task count."""
    extra = [f"seeds=[{experiment.seeds[0]}]"] if experiment.seeds else []
    if experiment.split.task_num > SMOKE_TASKS and all(arm.source == experiment.source for arm in experiment.arms):
        extra.append(f"split.task_num={SMOKE_TASKS}")
    return SMOKE + extra + (SMOKE_DOMAIN if experiment.split.protocol != "class_incremental" else [])


def start(args: argparse.Namespace) -> int:
    experiment = only_arms(load_experiment(args.experiment, args.overrides, args.variant), args.arms)
    if args.smoke:
        args.overrides = [*args.overrides, *smoke_overrides(experiment)]
        experiment = only_arms(load_experiment(args.experiment, args.overrides, args.variant), args.arms)
        args.tracking_uri = args.tracking_uri or str(cache_dir() / "smoke-mlruns")
    uri = args.tracking_uri or experiment.tracking.uri
    if args.dry_run:
        split = build_split(experiment)
        print(yaml.safe_dump({"name": experiment.name, "split": split_params(experiment, split),
                              "arms": [a.to_dict() for a in experiment.arms]}, sort_keys=False))
        print(plan(experiment, split))
        return 0
    tracker = make_tracker(uri, experiment.tracking.experiment or experiment.name, experiment.tracking.local_dir)
    tracker.describe(describe(experiment))
    split = build_split(experiment)
    parent = tracker.start(experiment.name, {
        "kind": "experiment", "experiment_file": str(Path(args.experiment).resolve()),
        "experiment_file_relative": os.path.relpath(Path(args.experiment).resolve()),
        "overrides": json.dumps(args.overrides), "variant": args.variant or "", "arms": args.arms or "",
        "git_commit": git_commit(),
        "split_hash": split.digest, **{f"auto_{k}": v for k, v in auto_precision(experiment.engine.device).items()}})
    print(f"parent run {parent.run_id} ({tracker.description})", flush=True)
    parent.log_params({"split": split_params(experiment, split), "arms": [a.name for a in experiment.arms],
                       "seeds": experiment.seeds})
    # A metric from the start: a committed parent with an empty metrics/ folder would be lost by git.
    parent.log_metrics({"planned_runs": len(experiment.seeded_arms())})
    log_resolved(parent, yaml.safe_dump(experiment.raw, sort_keys=False))
    progress = Progress(total_steps(experiment, split), enabled=not args.quiet)
    execute(experiment, split, tracker, parent, progress)
    if isinstance(tracker, MlflowTracker):
        print(f"view the runs: {ui_link(tracker)}")
    return 0


def log_resolved(parent: Run, text: str, folder: str | None = None) -> None:
    """The resolved experiment file as the parent's ``RESOLVED`` artifact (in ``folder``, else at the top,
    where it is what ``--resume`` compares the experiment file against)."""
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / RESOLVED
        resolved.write_text(text)
        parent.log_artifact(resolved, folder)


def with_forced_change(earlier: list[dict[str, Any]], keys: list[str],
                       **extra: Any) -> tuple[str, list[dict[str, Any]]]:
    """A ``forced_changes`` record (a parent run's tag, a study's attribute) after one more ``--force``: the
    UTC time it was let through, which is also its name, and the changed keys (at most 40, to keep the
    record small), plus whatever the caller keeps beside them."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return stamp, [*earlier, {"at": stamp, "keys": keys[:40], **extra}]


def record_forced_change(parent: Run, tags: dict[str, str], recorded: str, experiment: Experiment,
                         keys: list[str]) -> None:
    """``--resume --force`` over a changed experiment file: the arm runs that begin from now on follow the
    file as it is, so the parent records the change. The file as it was moves to ``forced/<UTC time>/``,
    the ``forced_changes`` tag lists each forced resume's time and changed keys, and the file as it is now
    becomes what later resumes compare against (so they need no ``--force`` for the same change)."""
    stamp, changes = with_forced_change(json.loads(tags.get("forced_changes", "[]")), keys)
    log_resolved(parent, recorded, f"forced/{stamp}")
    log_resolved(parent, yaml.safe_dump(experiment.raw, sort_keys=False))
    parent.set_tags({"forced_changes": json.dumps(changes)})
    print(f"--force: arm runs that begin now follow the changed keys ({', '.join(keys[:12])}); "
          f"the parent keeps the file as it was under forced/{stamp}/", flush=True)


def ui_link(tracker: MlflowTracker) -> str:
    """The experiment's runs table in ``mlflow ui`` (or the tracking server): the model-training layout
    (MLflow 3 opens in its GenAI layout unless the link asks for ``workflowType=machine_learning``) with
    the headline metric columns of the shared view ``VIEW`` selected."""
    page = f"#/experiments/{tracker.experiment_id}/runs?viewStateShareKey={VIEW}&workflowType=machine_learning"
    if tracker.uri.startswith(("http://", "https://")):
        return f"{tracker.uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {tracker.uri})"


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to every scalar, arms addressed by name as in overrides (``arms.gem.epoch``)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((item.get("name", i) if isinstance(item, dict) else i, item) for i, item in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(leaves(value, f"{prefix}{key}."))
    return out or {prefix: tree}


def changed_keys(before: dict[str, Any], after: dict[str, Any], arms: list[str] | None = None) -> list[str]:
    """The dotted keys whose values differ. ``arms``: count only these arms' keys among ``arms.*`` (an
    experiment started with ``--arms`` trains no other, so an arm added to its file changes none of its runs)."""
    a, b = leaves(before), leaves(after)
    keys = (k.rstrip(".") for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return sorted(k for k in keys if not arms or not k.startswith("arms.")
                  or any(f"{k}.".startswith(f"arms.{arm}.") for arm in arms))


def experiment_file(tags: dict[str, str]) -> Path:
    """The parent's experiment file: where it was, else the same file relative to this checkout (a resume in
    another clone, or a later session's fresh work tree)."""
    recorded = Path(tags["experiment_file"])
    for candidate in (recorded, Path(tags.get("experiment_file_relative", recorded.name)),
                      Path("experiments") / recorded.name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{recorded}: the experiment file of this run is gone (looked here too: "
                    f"{tags.get('experiment_file_relative', Path('experiments') / recorded.name)})")


def started_auto(parent_tags: dict[str, str], experiment: Experiment,
                 previous: dict[tuple[str, int], RunInfo]) -> dict[str, str] | None:
    """How ``engine.amp`` / ``channels_last`` ``auto`` resolved on the machine where the experiment started:
    the parent's ``auto_precision`` / ``auto_memory_format`` tags, or, for a parent recorded before it had
    them, the tags of its first arm run that left both switches at ``auto`` on a convolutional backbone.
    None when neither tells (``auto`` then resolves on this machine)."""
    if "auto_precision" in parent_tags:
        return {"precision": parent_tags["auto_precision"], "memory_format": parent_tags.get("auto_memory_format", "")}
    for arm in experiment.seeded_arms():
        info = previous.get((arm.name, arm.engine.seed))
        if (info is not None and "precision" in info.tags and arm.engine.amp == arm.engine.channels_last == "auto"
                and convolutional(arm.backbone.name)):
            return {"precision": info.tags["precision"], "memory_format": info.tags.get("memory_format", "")}
    return None


def resume(args: argparse.Namespace) -> int:
    tracker = make_tracker(args.tracking_uri, None)
    info = tracker.info(args.resume)
    if info.tags.get("kind") != "experiment":
        raise UserError(f"run {args.resume} is not an experiment's parent run (its arms are resumed through it)")
    if info.status == "FINISHED":
        raise UserError(f"experiment run {args.resume} already finished; nothing to resume")
    tracker.use_experiment(info.experiment)
    experiment = only_arms(load_experiment(experiment_file(info.tags), json.loads(info.tags.get("overrides", "[]")),
                                           info.tags.get("variant") or None), info.tags.get("arms"))
    recorded = tracker.read_artifact(args.resume, RESOLVED)
    diff = []
    if recorded is not None:
        diff = changed_keys(yaml.safe_load(recorded), yaml.safe_load(yaml.safe_dump(experiment.raw)),
                            [arm.name for arm in experiment.arms] if info.tags.get("arms") else None)
        if diff and not args.force:
            raise UserError(f"{info.tags['experiment_file']} changed since run {args.resume} started "
                            f"(keys: {', '.join(diff[:12])}); pass --force to continue anyway")
    split = build_split(experiment)
    if split.digest != info.tags.get("split_hash", split.digest) and not args.force:
        raise UserError(f"the split's data changed since run {args.resume} started (hash {split.digest}, was "
                        f"{info.tags['split_hash']}); pass --force to continue anyway")
    parent = tracker.reopen(args.resume)
    print(f"resuming parent run {parent.run_id} ({tracker.description})", flush=True)
    if diff:
        record_forced_change(parent, info.tags, recorded, experiment, diff)
    previous = {}
    for child in sorted(tracker.children(args.resume), key=lambda c: c.status == "FINISHED"):
        previous[run_key(child)] = child  # a FINISHED run of an arm and seed wins over an interrupted one
    auto_as = started_auto(info.tags, experiment, previous)
    here = auto_precision(experiment.engine.device)
    if auto_as is not None and auto_as != here:
        print(f"engine auto: arm runs that begin now compute in {auto_as['precision']}, {auto_as['memory_format']}, "
              f"as where this experiment started (here auto would choose {here['precision']}, "
              f"{here['memory_format']})", flush=True)
    progress = Progress(total_steps(experiment, split), enabled=not args.quiet)
    execute(experiment, split, tracker, parent, progress, previous, restart=args.force, auto_as=auto_as)
    return 0
