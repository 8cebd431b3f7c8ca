"""An Optuna study over one arm's recipe, every trial its own MLflow run under the study's parent run.

Trials train on the split's training data minus a held-out validation part (``search.val_fraction`` of each
class) and are scored on it, never on the test set; a task-0 objective stops after task 0. Each trial
reports validation accuracy after every epoch so the pruner can stop bad trials early. When the study
holds ``search.n_trials`` finished trials, the best recipe is trained again once per engine seed of the
file's ``seeds`` (else its arm's seed) and scored on the test split: that mean is the number reported.

A study spans sessions: every trial and re-run checkpoints each epoch into its MLflow run, a trial that was
interrupted is continued from there (``harness.tune.resume``), and the same command, run again, carries
the study on to its ``n_trials`` and its re-runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from harness.config.experiment import Experiment, load_experiment
from harness.engine.progress import Progress
from harness.engine.runner import (
    arm_steps,
    auto_precision,
    build_split,
    git_commit,
    recorded_precision,
    resume_checkpoint,
    split_params,
)
from harness.engine.session import changed_keys, with_forced_change
from harness.engine.trainer import CHECKPOINTS, ArmTrainer, resolve_device
from harness.errors import Interrupted, UserError
from harness.tracking import Run, Tracker
from harness.tune.resume import (
    CONTINUES_ATTR,
    HEARTBEAT_ATTR,
    INTERRUPTED_ATTR,
    RUN_ATTR,
    STALE_AFTER,
    WORKER_ATTR,
    enqueue_continuations,
    fail_abandoned,
    replay,
    worker_id,
)
from harness.tune.space import TASK0_OBJECTIVES, Dimension, SearchOptions, parse_search

PARENT_ATTR = "mlflow_parent_run_id"
RECIPE_ATTR = "recipe"  # the resolved experiment every trial of the study trains, less search.n_trials
AUTO_ATTR = "auto_precision"  # how engine ``auto`` resolved where the study started
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class StudyOutcome:
    study: optuna.Study
    best_params: dict[str, Any]
    best_value: float
    test_value: float  # the mean over the re-runs' seeds
    test_values: list[float]
    top: pd.DataFrame
    parent_run_id: str
    seconds: float


def make_sampler(options: SearchOptions) -> optuna.samplers.BaseSampler:
    seed = options.sampler.get("seed")
    if options.sampler.get("name", "TPE") == "Random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(options: SearchOptions) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose validation accuracy falls below the median of earlier trials at the
    same epoch; ``hyperband``: successive halving over brackets of epoch budgets (from ``min_resource``
    epochs up to the trial's last), so most of a CPU budget goes to the trials still in the running."""
    name = options.pruner.get("name", "median")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=options.pruner.get("min_resource", 5),
                                              reduction_factor=options.pruner.get("reduction_factor", 3))
    return optuna.pruners.MedianPruner(n_startup_trials=options.pruner.get("n_startup_trials", 3),
                                       n_warmup_steps=options.pruner.get("n_warmup_steps", 2))


def storage_of(url: str) -> str | optuna.storages.BaseStorage:
    """An RDB URL as it is, or ``journal:PATH``: Optuna's append-only journal file, which git can keep
    beside the MLflow record (a study only ever adds lines to it)."""
    if not url.startswith("journal:"):
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(url.removeprefix("journal:"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(name: str, storage: str, options: SearchOptions, attempts: int = 6) -> optuna.Study:
    """Create or load the study. Processes that start together on an empty database race to create
    Optuna's tables; the loser gets an integrity error (PostgreSQL) or "table already exists" (SQLite) and
    simply tries again. A database that stays unreachable fails after the last attempt."""
    import sqlalchemy.exc

    def create() -> optuna.Study:
        study = optuna.create_study(study_name=name, storage=storage_of(storage), direction=options.direction,
                                    sampler=make_sampler(options), pruner=make_pruner(options), load_if_exists=True)
        with warnings.catch_warnings():  # experimental in Optuna, and the only way to name the objective
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"val_{options.objective}"])  # what optuna-dashboard labels the objective
        return study

    try:
        for attempt in range(attempts - 1):
            try:
                return create()
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.InternalError, sqlalchemy.exc.OperationalError):
                time.sleep(0.5 * (attempt + 1))
        return create()
    except (optuna.exceptions.OptunaError, ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise UserError(f"Optuna storage {storage}: {str(exc).splitlines()[0]}") from None


class Tuner:
    """Builds each trial's experiment from the file, its overrides and the sampled values."""

    def __init__(self, path: str, overrides: list[str], variant: str | None, tracker: Tracker,
                 show_progress: bool = False) -> None:
        self.path, self.overrides, self.variant, self.tracker = path, overrides, variant, tracker
        self.show_progress = show_progress
        self.auto_as: dict[str, str] | None = None  # set from the study (``hold_recipe``)
        base = load_experiment(path, overrides, variant)
        self.options, self.dims = parse_search(base.search, [a.name for a in base.arms], path)
        self.base = base
        self.task0 = self.options.objective in TASK0_OBJECTIVES
        # A variant is another search problem (the quick one trains 2 epochs): it gets a study of its own.
        self.study_name = self.options.study or (f"{base.name}-{variant}" if variant else base.name)
        self.test_seeds = base.seeds or [base.arm(self.options.arm).engine.seed]

    def experiment_for(self, values: dict[str, Any], evaluate_on: str) -> Experiment:
        arm = self.options.arm
        # JSON is valid YAML, so sampled values (numbers, whole scheduler blocks) pass as override strings
        extra = [f"arms.{arm}.{self.dim(n).path}={json.dumps(v)}" for n, v in values.items()]
        if evaluate_on == "val":
            extra.append(f"split.val_fraction={self.options.val_fraction}")
        if self.task0:
            extra.append("split.task_num=1")
        return load_experiment(self.path, [*self.overrides, *extra], self.variant)

    def dim(self, name: str) -> Dimension:
        return next(d for d in self.dims if d.name == name)

    def objective_value(self, summary: dict[str, float]) -> float:
        if self.options.objective not in summary:
            raise UserError(f"{self.path}: search.objective: no metric {self.options.objective!r}; "
                            f"known: {', '.join(sorted(summary))}")
        return float(summary[self.options.objective])

    def train(self, values: dict[str, Any], run: Run, evaluate_on: str, trial: optuna.Trial | None, *,
              seed: int | None = None, resume: bool = False) -> float:
        """Train the arm with ``values`` into ``run`` and return the objective. ``resume``: ``run`` was
        interrupted; continue it from its last checkpoint (from the start if it never wrote one). Until the
        arm finishes, its run's artifacts hold its checkpoint, so a later session on any machine continues it."""
        experiment = self.experiment_for(values, evaluate_on)
        arm = experiment.arm(self.options.arm)
        if seed is not None:
            arm = dataclasses.replace(arm, engine=dataclasses.replace(arm.engine, seed=seed))
        split = build_split(experiment)
        folder = run.local_dir() / CHECKPOINTS
        run.log_params({"split": split_params(experiment, split), **arm.to_dict()})  # the same values on a resume
        run.set_tags({"split_hash": split.digest, "device": str(resolve_device(arm.engine.device))})
        checkpoint = resume_checkpoint(run, arm, folder, restart=True) if resume else None
        if checkpoint is not None:  # computes on as it started, whatever ``auto`` picks on this machine
            arm = recorded_precision(arm, run.tracker.info(run.run_id).tags)
        elif self.auto_as is not None:  # and a fresh trial as the study started: one precision per study
            arm = recorded_precision(arm, self.auto_as, only_auto=True)

        def report(trainer: ArmTrainer, task: int, epoch: int) -> None:
            if trial is None:
                return
            row = trainer.evaluate(task)["cil"]
            sizes = trainer.evaluator.sizes[: task + 1]
            value = float((row[: task + 1] * sizes).sum() / sizes.sum())  # accuracy on the tasks seen so far
            step = trainer.state.global_epoch
            run.log_metrics({"epoch_val_acc": value}, step)
            trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {step} (validation accuracy {value:.4f})")

        if trial is not None and checkpoint is not None:
            replay(trial, run.tracker.metric_steps(run.run_id, "epoch_val_acc"), checkpoint["loop"]["global_epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned on its predecessor's curve at epoch {checkpoint['loop']['global_epoch']}")
        last_task = 0 if self.task0 else None
        progress = Progress(arm_steps(arm, split, last_task), enabled=self.show_progress)
        trainer = ArmTrainer(arm, split, run, progress, evaluate_on=evaluate_on, last_task=last_task, on_epoch=report,
                             checkpoint_dir=folder, on_checkpoint=lambda path: run.log_artifact(path, CHECKPOINTS))
        run.set_tags(trainer.precision.tags)
        try:
            summary = trainer.fit(checkpoint).summary
        finally:
            progress.close()
        run.log_metrics({k if k == "wall_seconds" else f"{trainer.eval_prefix}{k}": v for k, v in summary.items()})
        return self.objective_value(summary)


def drop_checkpoints(run: Run) -> None:
    """A trial or re-run that will not be continued keeps no checkpoint, here or in the record."""
    run.tracker.delete_artifacts(run.run_id, CHECKPOINTS)
    shutil.rmtree(run.local_dir(), ignore_errors=True)


def _trial_table(study: optuna.Study, top: int = 10) -> pd.DataFrame:
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    value = next(c for c in frame.columns if c.startswith("value"))  # value_<metric name> once names are set
    done = frame[frame["state"] == "COMPLETE"].sort_values(value, ascending=study.direction.name == "MINIMIZE")
    return done.head(top).reset_index(drop=True)


def _log_visualizations(study: optuna.Study, parent: Run, folder: Path) -> list[str]:
    """Optuna's plots (importances need two finished trials) as PNG artifacts; returns what was saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    saved = []
    plots = {"optimization_history": ov.plot_optimization_history, "parallel_coordinate": ov.plot_parallel_coordinate,
             "param_importances": ov.plot_param_importances}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for name, plot in plots.items():
        if name == "param_importances" and len(complete) < 2:
            continue
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. a single distinct value: Optuna cannot draw it
            print(f"skipped {name} plot: {exc}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        parent.log_artifact(path, "optuna")
        saved.append(name)
    return saved


def _parent_run(tracker: Tracker, study: optuna.Study, tuner: Tuner, storage: str) -> Run:
    """One MLflow parent per study, shared by every process that works on it (its id is a study attr)."""
    existing = study.user_attrs.get(PARENT_ATTR)
    if existing and tracker.exists(existing):
        return tracker.reopen(existing)
    # No parent yet, or the study's parent lives in another MLflow store: this store gets its own.
    parent = tracker.start(f"study:{study.study_name}", {
        "kind": "study", "study": study.study_name, "storage": storage, "experiment_file": str(Path(tuner.path).resolve()),
        "objective": tuner.options.objective, "direction": tuner.options.direction, "git_commit": git_commit()})
    parent.log_params({"search": {"arm": tuner.options.arm, "space": {d.name: {d.kind: d.args} for d in tuner.dims},
                                  "val_fraction": tuner.options.val_fraction}})
    study.set_user_attr(PARENT_ATTR, parent.run_id)
    return parent


def recipe_of(experiment: Experiment) -> dict[str, Any]:
    """What a study's trials must share to be compared: the resolved experiment, less ``search.n_trials``
    (a study may be given more trials in a later session)."""
    recipe = json.loads(json.dumps(experiment.raw, default=str))
    recipe.get("search", {}).pop("n_trials", None)
    return recipe


def hold_recipe(study: optuna.Study, tuner: Tuner, force: bool) -> None:
    """A study that spans sessions compares trials only if every trial trains the same recipe the same way.
    Its first call records the recipe and how ``auto`` precision resolved on its machine (study attributes,
    beside the trials in the storage); every trial computes in that precision on any machine. A later call
    whose experiment file or overrides changed the recipe stops naming the keys, unless ``force``: then the
    ``forced_changes`` attribute records the time, the keys and the recipe as it was, and the new recipe is
    held from then on."""
    recipe, held = recipe_of(tuner.base), study.user_attrs.get(RECIPE_ATTR)
    keys = changed_keys(held, recipe) if held is not None else []
    if keys and not force:
        raise UserError(f"study {study.study_name}: its trials trained another recipe (keys: {', '.join(keys[:12])}); "
                        "pass --force to go on with the file as it is, or --study NAME for a new study")
    if keys:
        _, changes = with_forced_change(study.user_attrs.get("forced_changes", []), keys, before=held)
        study.set_user_attr("forced_changes", changes)
        print(f"--force: study {study.study_name}'s trials from now on follow the changed keys ({', '.join(keys[:12])})",
              file=sys.stderr, flush=True)
    if held is None or keys:
        study.set_user_attr(RECIPE_ATTR, recipe)
    if AUTO_ATTR not in study.user_attrs:
        study.set_user_attr(AUTO_ATTR, auto_precision(tuner.base.arm(tuner.options.arm).engine.device))
    tuner.auto_as = study.user_attrs[AUTO_ATTR]


def prepare_study(path: str, overrides: list[str], tracker: Tracker, *, storage: str, study_name: str | None,
                  variant: str | None, stale_after: float = STALE_AFTER, force: bool = False) -> int:
    """Create the study and its MLflow parent run once, hold its recipe (``hold_recipe``), and queue the
    continuations of interrupted trials, before worker processes share them. Returns the trials still to
    run for ``search.n_trials``."""
    tuner = Tuner(path, overrides, variant, tracker)
    study = open_study(study_name or tuner.study_name, storage, tuner.options)
    hold_recipe(study, tuner, force)
    _parent_run(tracker, study, tuner, storage)
    fail_abandoned(study, stale_after)
    enqueue_continuations(study)
    return max(tuner.options.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED_STATES)), 0)


def trial_line(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial: its value and state, and the best so far."""
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = f"best {study.best_value:.4f} (trial {study.best_trial.number})" if done else "no trial complete yet"
    print(f"trial {trial.number}: {trial.state.name} {study.metric_names[0] if study.metric_names else 'value'} "
          f"{value}; {best}", file=sys.stderr, flush=True)


def _trial_run(tracker: Tracker, trial: optuna.Trial, name: str, parent: Run, arm: str) -> tuple[Run, bool]:
    """The trial's MLflow run: its predecessor's, reopened, when it continues an interrupted trial; else a new
    one. Returns the run and whether it continues."""
    before = trial.user_attrs.get(RUN_ATTR)
    tags = {"kind": "trial", "study": name, "trial": trial.number, "arm": arm}
    if CONTINUES_ATTR in trial.user_attrs and before and tracker.exists(before):
        run = tracker.reopen(before)
        run.set_tags({**tags, "state": "RUNNING", "continues_trial": trial.user_attrs[CONTINUES_ATTR]})
        return run, True
    return tracker.start(f"trial {trial.number}", tags, parent=parent), False


def make_objective(tuner: Tuner, tracker: Tracker, parent: Run, name: str) -> Callable[[optuna.Trial], float]:
    """Each trial trains into its MLflow run, whose ``state`` tag mirrors Optuna's. An interruption marks the
    trial for continuation and stops the study (Optuna records the trial FAIL and re-raises it)."""

    def objective(trial: optuna.Trial) -> float:
        values = {d.name: d.suggest(trial) for d in tuner.dims}
        trial.set_user_attr(WORKER_ATTR, worker_id())
        trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        run, continues = _trial_run(tracker, trial, name, parent, tuner.options.arm)
        trial.set_user_attr(RUN_ATTR, run.run_id)  # from the dashboard to the trial's MLflow run
        run.log_params({"trial": values})
        try:
            value = tuner.train(values, run, "val", trial, resume=continues)
            if not math.isfinite(value):
                raise UserError(f"trial {trial.number}: objective is {value}")
        except optuna.TrialPruned:
            run.set_tags({"state": "PRUNED"})
            drop_checkpoints(run)
            run.end("KILLED")
            raise
        except (Interrupted, KeyboardInterrupt) as exc:
            trial.set_user_attr(INTERRUPTED_ATTR, str(exc) or "interrupted")
            run.set_tags({"state": "INTERRUPTED"})
            run.end("KILLED")
            raise KeyboardInterrupt(str(exc)) from exc  # not in optimize's catch: the study stops here
        except Exception as exc:
            run.set_tags({"state": "FAIL", "error": f"{type(exc).__name__}: {exc}"[:500]})
            drop_checkpoints(run)
            run.end("FAILED")
            raise
        run.log_metrics({"objective": value})
        run.set_tags({"state": "COMPLETE"})
        drop_checkpoints(run)
        run.end("FINISHED")
        return value

    return objective


def best_on_test(tuner: Tuner, tracker: Tracker, parent: Run, best: optuna.trial.FrozenTrial,
                 study: str) -> dict[int, tuple[str, float]]:
    """Train the best trial's recipe on the test split once per seed of ``tuner.test_seeds``; a re-run that
    finished before is read back, an interrupted one continues from its checkpoint. Returns seed -> (run id,
    test objective)."""
    values = {n: tuner.dim(n).decode(v) for n, v in best.params.items()}
    earlier = {c.tags.get("seed"): c for c in tracker.children(parent.run_id)
               if c.tags.get("kind") == "best_rerun" and c.tags.get("trial") == str(best.number)}
    scores = {}
    for seed in tuner.test_seeds:
        found = earlier.get(str(seed))
        if found is not None and found.status == "FINISHED" and "objective_test" in found.metrics:
            scores[seed] = (found.run_id, found.metrics["objective_test"])
            continue
        if found is not None:
            run = tracker.reopen(found.run_id)
        else:
            run = tracker.start(f"best recipe on test seed={seed}", {"kind": "best_rerun", "study": study,
                                "trial": best.number, "arm": tuner.options.arm, "seed": seed}, parent=parent)
            run.log_params({"trial": values})  # the trials' parameter names and values
        try:
            value = tuner.train(values, run, "test", None, seed=seed, resume=found is not None)
        except BaseException:
            run.end("KILLED")  # its checkpoint stays: the next call continues it
            raise
        run.log_metrics({"objective_test": value})
        drop_checkpoints(run)
        run.end("FINISHED")
        scores[seed] = (run.run_id, value)
    return scores


def run_study(path: str, overrides: list[str], tracker: Tracker, *, storage: str, study_name: str | None = None,
              n_trials: int | None = None, timeout: float | None = None, variant: str | None = None,
              enqueue: list[dict[str, Any]] | None = None, rerun_best: bool = True, progress: bool = False,
              continue_interrupted: bool = True, stale_after: float = STALE_AFTER, force: bool = False) -> StudyOutcome:
    """Run (or continue) the study; several processes with the same storage and name share it. ``n_trials``:
    trials this call runs (default: as many as the study lacks of ``search.n_trials`` finished, i.e.
    complete or pruned, trials). ``continue_interrupted``: first queue a continuation of every interrupted
    trial (worker processes leave that to the process that started them). ``progress``: a step bar for the
    running trial and one line per finished trial on stderr. ``force``: go on after the experiment changed
    the study's recipe (``hold_recipe``)."""
    started = time.monotonic()
    tuner = Tuner(path, overrides, variant, tracker, show_progress=progress)
    options = tuner.options
    name = study_name or tuner.study_name
    study = open_study(name, storage, options)
    hold_recipe(study, tuner, force)
    parent = _parent_run(tracker, study, tuner, storage)
    parent.set_tags({"n_trials": options.n_trials, "state": "RUNNING"})  # what the record's progress line counts to
    if continue_interrupted:
        fail_abandoned(study, stale_after)
        enqueue_continuations(study)
    for params in enqueue or []:
        study.enqueue_trial(params)
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [trial_line] if progress else []
    if n_trials is None:  # up to the study's total, however many calls and sessions it takes
        n_trials = max(options.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED_STATES)), 0)
        callbacks.append(optuna.study.MaxTrialsCallback(options.n_trials, states=FINISHED_STATES))
    try:
        study.optimize(make_objective(tuner, tracker, parent, name), n_trials=n_trials,
                       timeout=timeout or options.timeout, catch=(Exception,), gc_after_trial=True, callbacks=callbacks)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            parent.end("FAILED")
            raise UserError(f"study {name}: no trial completed (see the trial runs' 'error' tags in MLflow)")
        best = study.best_trial
        scores = best_on_test(tuner, tracker, parent, best, name) if rerun_best else {}
    except (Interrupted, KeyboardInterrupt):
        parent.set_tags({"state": "INTERRUPTED"})
        parent.end("KILLED")
        raise
    test_values = [value for _, value in scores.values()]
    test_value = float(pd.Series(test_values).mean()) if test_values else math.nan
    if scores:
        study.set_user_attr("best_test_value", test_value)  # the number to report, beside the study
        study.set_user_attr("best_test_values", test_values)
        study.set_user_attr("best_test_run_ids", [run_id for run_id, _ in scores.values()])
    top = _trial_table(study)
    seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "top_trials.csv"
        top.to_csv(table, index=False)
        parent.log_artifact(table)
        _log_visualizations(study, parent, Path(tmp))
    spread = float(pd.Series(test_values).std()) if len(test_values) > 1 else math.nan  # sample std, as the report's rows
    parent.log_metrics({"best_value": study.best_value, "best_test_value": test_value, "best_test_std": spread,
                        "best_test_n": len(test_values), "n_trials": len(study.trials), "wall_seconds": seconds})
    # Tags, not params: a study that a later call carries on may find another best trial.
    # COMPLETE: the study has its n_trials and its re-runs; PARTIAL: a later call carries it on.
    whole = len(study.get_trials(deepcopy=False, states=FINISHED_STATES)) >= options.n_trials and bool(scores)
    parent.set_tags({f"best.{k}": v for k, v in best.params.items()} | {
        "best.trial": best.number, "state": "COMPLETE" if whole else "PARTIAL",
        "best_test_seeds": ", ".join(str(seed) for seed in scores)})
    parent.end("FINISHED")
    return StudyOutcome(study, best.params, study.best_value, test_value, test_values, top, parent.run_id, seconds)
