"""Optuna studies on digits: SQLite storage, resume by name, every trial in MLflow, failures, two processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import torch

from harness.engine.precision import native_bf16
from harness.tracking import make_tracker
from harness.tune.study import run_study, storage_of
from tests.conftest import ROOT, digits_arm, digits_experiment, expect_exit_2, write_yaml

SEARCH = {"arm": "gem", "objective": "cil_acc", "n_trials": 3, "val_fraction": 0.2,
          "sampler": {"name": "TPE", "seed": 0}, "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
          "space": {"lr": {"log_uniform": [0.01, 0.3]}, "memory_strength": {"uniform": [0.0, 1.0]},
                    "scheduler": {"choice": [{"name": "Constant"}, {"name": "StepLR", "kwargs": {"step_size": 1}}]}}}


def tune_file(tmp_path: Path, **search: object) -> Path:
    raw = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=2)], task_num=3)
    raw["name"] = "tune-test"
    raw["search"] = {**SEARCH, **search}
    return write_yaml(tmp_path / "tune.yaml", raw)


def trial_runs(uri: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tune-test"])
    return runs[runs["tags.kind"] == "trial"]


def test_study_completes_resumes_by_name_and_records_every_trial(tmp_path: Path, mlflow_uri: str) -> None:
    path = tune_file(tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracker = make_tracker(mlflow_uri, "tune-test")
    first = run_study(str(path), [], tracker, storage=storage, study_name="s1", n_trials=3)
    assert len(first.study.trials) == 3 and 0 <= first.best_value <= 1 and 0 <= first.test_value <= 1
    again = run_study(str(path), [], tracker, storage=storage, study_name="s1", n_trials=2, rerun_best=False)
    assert [t.number for t in again.study.trials] == [0, 1, 2, 3, 4]
    assert again.parent_run_id == first.parent_run_id  # one MLflow parent per study

    runs = trial_runs(mlflow_uri)
    assert sorted(runs["tags.trial"].astype(int)) == [0, 1, 2, 3, 4]
    # Optuna and MLflow point at each other: trial -> run id, run -> trial number, study -> best test score
    assert {t.user_attrs["mlflow_run_id"] for t in again.study.trials} == set(runs["run_id"])
    assert again.study.metric_names == ["val_cil_acc"]
    assert first.study.user_attrs["best_test_value"] == pytest.approx(first.test_value)
    assert {"val_cil_acc", "val_task0_acc"} <= {c.removeprefix("metrics.") for c in runs.columns}
    assert "metrics.cil_acc" not in runs.columns or runs["metrics.cil_acc"].isna().all()  # no test names on trials
    assert (runs["tags.mlflow.parentRunId"] == first.parent_run_id).all()
    states = {t.number: t.state.name for t in again.study.trials}
    for _, run in runs.iterrows():
        assert run["tags.state"] == states[int(run["tags.trial"])]
        assert run["params.trial.lr"] is not None and run["params.split.val_fraction"] == "0.2"
    finished = runs[runs["tags.state"] == "COMPLETE"]
    assert finished["metrics.objective"].notna().all()
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    history = client.get_metric_history(finished.iloc[0]["run_id"], "epoch_val_acc")
    assert len(history) == 3 * 2  # reported after every epoch: 3 tasks x 2 epochs
    artifacts = {a.path for a in client.list_artifacts(first.parent_run_id)}
    assert "top_trials.csv" in artifacts and "optuna" in artifacts
    plots = {a.path for a in client.list_artifacts(first.parent_run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png"} <= plots


def test_a_failing_trial_is_marked_fail_and_the_study_continues(tmp_path: Path, mlflow_uri: str) -> None:
    path = tune_file(tmp_path, space={"lr": {"log_uniform": [0.01, 0.1]}})
    tracker = make_tracker(mlflow_uri, "tune-test")
    outcome = run_study(str(path), [], tracker, storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="fails",
                        n_trials=3, enqueue=[{"lr": 1e9}], rerun_best=False)
    states = [t.state for t in outcome.study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL and len(states) == 3
    failed = trial_runs(mlflow_uri).set_index("tags.trial").loc["0"]
    assert failed["tags.state"] == "FAIL" and failed["status"] == "FAILED"
    assert "non-finite loss" in failed["tags.error"]


def _two_processes_share(tmp_path: Path, storage: str, study: str) -> None:
    path = tune_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "harness.tune", str(path), "--storage", storage, "--study", study,
               "--n-trials", "2", "--no-rerun", "--tracking-uri", "none"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    trials = optuna.load_study(study_name=study, storage=storage).trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # four trials, no duplicate numbers


def test_two_processes_share_one_sqlite_study(tmp_path: Path) -> None:
    _two_processes_share(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", "shared-sqlite")


@pytest.mark.skipif(not os.environ.get("HARNESS_TEST_POSTGRES_URL"),
                    reason="set HARNESS_TEST_POSTGRES_URL (.ci/run starts a PostgreSQL server and sets it)")
def test_two_processes_share_one_postgresql_study(tmp_path: Path) -> None:
    url = os.environ["HARNESS_TEST_POSTGRES_URL"]
    _two_processes_share(tmp_path, url, f"shared-pg-{os.getpid()}-{tmp_path.name[-8:]}")


def test_bad_search_block_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.tune.__main__ import main

    path = tune_file(tmp_path, space={"lr": {"log_uniform": [0.5, 0.1]}})
    assert main([str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--tracking-uri", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search.space.lr" in err and "below high" in err


def test_a_study_holds_its_recipe_and_precision_and_a_changed_file_needs_force(
        tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A study that spans sessions trains one recipe in one precision: a changed experiment file stops the
    next call with the changed key (exit 2, one line); --force goes on and the study records the change."""
    from harness.tune.__main__ import main

    path = tune_file(tmp_path)
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    args = [str(path), "--storage", storage, "--study", "held", "--tracking-uri", mlflow_uri, "--n-trials", "1",
            "--no-rerun", "--quiet"]
    assert main(args) == 0
    study = optuna.load_study(study_name="held", storage=storage_of(storage))
    assert study.user_attrs["recipe"]["arms"][0]["epoch"] == 2 and "n_trials" not in study.user_attrs["recipe"]["search"]
    assert study.user_attrs["auto_precision"]["precision"] == ("bf16-autocast" if native_bf16(torch.device("cpu"))
                                                               else "fp32")
    assert main([*args, "search.n_trials=9"]) == 0  # more trials is the same study
    capsys.readouterr()
    expect_exit_2(main, [*args, "arms.gem.epoch=1"], capsys, "study held", "arms.gem.epoch", "--force")
    assert main([*args, "arms.gem.epoch=1", "--force"]) == 0
    study = optuna.load_study(study_name="held", storage=storage_of(storage))
    (change,) = study.user_attrs["forced_changes"]
    assert change["keys"] == ["arms.gem.epoch"] and change["before"]["arms"][0]["epoch"] == 2
    assert study.user_attrs["recipe"]["arms"][0]["epoch"] == 1
    assert main([*args, "arms.gem.epoch=1"]) == 0  # the new recipe is the study's now
    assert len(study.trials) == 3 + 1
    assert set(trial_runs(mlflow_uri)["tags.precision"]) == {study.user_attrs["auto_precision"]["precision"]}


def test_a_journal_study_beside_the_record_resumes_by_name_with_hyperband(tmp_path: Path, mlflow_uri: str) -> None:
    path = tune_file(tmp_path, pruner={"name": "hyperband", "min_resource": 1, "reduction_factor": 3})
    storage = f"journal:{tmp_path / 'mlruns' / 'optuna.journal'}"
    tracker = make_tracker(mlflow_uri, "tune-test")
    first = run_study(str(path), [], tracker, storage=storage, study_name="j", n_trials=2, rerun_best=False)
    assert isinstance(first.study.pruner, optuna.pruners.HyperbandPruner)
    again = run_study(str(path), [], tracker, storage=storage, study_name="j", n_trials=1, rerun_best=False)
    assert [t.number for t in again.study.trials] == [0, 1, 2]
    lines = (tmp_path / "mlruns" / "optuna.journal").read_text().splitlines()
    assert len(lines) > 10  # an append-only log of the study's operations


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_below_one_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str) -> None:
    from harness.tune.__main__ import main

    assert main([str(tune_file(tmp_path)), "--workers", workers, "--tracking-uri", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --workers {workers}: must be at least 1"


def test_two_workers_share_one_study_and_the_best_recipe_is_rerun_once(tmp_path: Path, mlflow_uri: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from harness.tune.__main__ import main

    storage = f"journal:{tmp_path / 'optuna.journal'}"
    assert main([str(tune_file(tmp_path)), "--workers", "2", "--n-trials", "3", "--storage", storage, "--study", "w",
                 "--tracking-uri", mlflow_uri, "--quiet"]) == 0
    trials = optuna.load_study(study_name="w", storage=storage_of(storage)).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]  # split 2 + 1 over the workers, no number twice
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["tune-test"])
    assert (runs["tags.kind"] == "study").sum() == 1  # one parent, created before the workers started
    assert (runs["tags.kind"] == "best_rerun").sum() == 1


# -- a study across sessions: interrupted trials continue, the total holds, the best recipe is re-run per seed --
def _start_tune(path: Path, storage: str, uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "harness.tune", str(path), "--storage", storage, "--study", "long",
                             "--tracking-uri", uri, "--quiet"], cwd=path.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checkpoints(cache: Path) -> dict[str, dict]:
    """Run id -> the loop state of that run's checkpoint in ``cache``, for every readable one."""
    found = {}
    try:
        paths = list(cache.rglob("checkpoints/last.pt"))
    except FileNotFoundError:  # a finished trial's folder left the cache while it was listed: callers poll again
        return found
    for path in paths:
        try:
            found[path.parent.parent.name] = torch.load(path, weights_only=True)["loop"]
        except Exception:  # a checkpoint being replaced right now
            continue
    return found


def _interrupt_after(proc: subprocess.Popen, cache: Path, sig: int, epochs: int, skip: str = "") -> str:
    """Send ``sig`` once a run other than ``skip`` has a checkpoint past ``epochs`` epochs of task 1
    (mid-task); returns that run's id."""
    deadline = time.monotonic() + 300
    while True:
        for run_id, loop in _checkpoints(cache).items():
            if run_id != skip and loop["task"] == 1 and loop["epoch"] >= epochs:
                proc.send_signal(sig)
                return run_id
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint mid-trial"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_trial_is_continued_from_its_checkpoint_to_the_same_value(
        tmp_path: Path, sig: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # where the trials' checkpoints go
    raw = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=12)], task_num=3)
    raw["name"] = "tune-test"
    raw["search"] = {**SEARCH, "n_trials": 2, "pruner": {"name": "none"}}
    path = write_yaml(tmp_path / "tune.yaml", raw)
    reference = run_study(str(path), [], make_tracker(f"sqlite:///{tmp_path / 'ref' / 'mlflow.db'}", "tune-test"),
                          storage=f"journal:{tmp_path / 'ref' / 'optuna.journal'}", study_name="long", rerun_best=False)

    uri, storage = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", f"journal:{tmp_path / 'mlruns' / 'optuna.journal'}"
    proc = _start_tune(path, storage, uri)
    _interrupt_after(proc, tmp_path / "cache", sig, epochs=4)
    _, err = proc.communicate(timeout=120)
    study = optuna.load_study(study_name="long", storage=storage_of(storage))
    (stopped,) = study.trials
    run_id = stopped.user_attrs["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    if sig == signal.SIGINT:  # the trial and its run are marked; the study stops instead of going on to trial 1
        assert proc.returncode == 130
        assert err.strip().splitlines()[-1].startswith("interrupted: ")
        assert f"continue with: python -m harness.tune {path}" in err
        assert stopped.state == optuna.trial.TrialState.FAIL and "interrupted" in stopped.user_attrs
        assert client.get_run(run_id).info.status == "KILLED"
        assert client.get_run(run_id).data.tags["state"] == "INTERRUPTED"
    else:  # a SIGKILL leaves the trial RUNNING in the study, with the pid of a process that is gone
        assert proc.returncode == -signal.SIGKILL and stopped.state == optuna.trial.TrialState.RUNNING
        shutil.rmtree(tmp_path / "cache")  # and a fresh machine continues it from the record alone
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.pt"]

    again = run_study(str(path), [], make_tracker(uri, "tune-test"), storage=storage, study_name="long",
                      rerun_best=False)
    first, continued, new = again.study.trials
    assert first.state == optuna.trial.TrialState.FAIL and "interrupted" in first.user_attrs
    assert continued.user_attrs["continues"] == 0 and continued.params == first.params
    assert continued.user_attrs["mlflow_run_id"] == run_id  # trained on in the same MLflow run
    assert new.state == continued.state == optuna.trial.TrialState.COMPLETE  # 2 finished trials: search.n_trials
    # exactly what the uninterrupted study's first trial gave, and each epoch's value reported once
    assert continued.value == reference.study.trials[0].value
    assert continued.intermediate_values == reference.study.trials[0].intermediate_values
    # each epoch once, also where a SIGKILL fell between an epoch's metrics and its checkpoint (that epoch is
    # trained again from the checkpoint, and the record's value is kept: Run.continued)
    steps = [m.step for m in client.get_metric_history(run_id, "epoch_val_acc")]
    assert sorted(steps) == list(range(1, 3 * 12 + 1))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial"] == "1" and run.data.tags["continues_trial"] == "0"
    assert client.list_artifacts(run_id, "checkpoints") == []  # a finished trial keeps no checkpoint


def test_the_study_runs_up_to_n_trials_and_reruns_the_best_recipe_once_per_seed(tmp_path: Path, mlflow_uri: str) -> None:
    from harness.report import _test_score

    raw = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=2)], task_num=3)
    raw.update(name="tune-test", seeds=[0, 1], search={**SEARCH, "n_trials": 3})
    path = write_yaml(tmp_path / "tune.yaml", raw)
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    tracker = make_tracker(mlflow_uri, "tune-test")
    part = run_study(str(path), [], tracker, storage=storage, study_name="t", n_trials=1, rerun_best=False)
    assert len(part.study.trials) == 1
    whole = run_study(str(path), [], tracker, storage=storage, study_name="t")  # a later call: up to search.n_trials
    assert len(whole.study.trials) == 3 and len(whole.test_values) == 2
    assert whole.test_value == pytest.approx(sum(whole.test_values) / 2)
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["tune-test"])
    reruns = runs[runs["tags.kind"] == "best_rerun"]
    assert sorted(reruns["tags.seed"]) == ["0", "1"] and set(reruns["params.engine.seed"]) == {"0", "1"}
    assert (reruns["tags.trial"] == str(whole.study.best_trial.number)).all()
    assert sorted(reruns["metrics.objective_test"]) == sorted(whole.test_values)
    assert whole.study.user_attrs["best_test_values"] == whole.test_values

    again = run_study(str(path), [], tracker, storage=storage, study_name="t")  # nothing left: no trial, no re-run
    assert len(again.study.trials) == 3 and again.test_values == whole.test_values
    runs = mlflow.search_runs(experiment_names=["tune-test"])
    assert (runs["tags.kind"] == "best_rerun").sum() == 2
    parent = runs[runs["tags.kind"] == "study"].iloc[0]
    assert parent["metrics.best_test_n"] == 2 and parent["tags.best.trial"] == str(whole.study.best_trial.number)
    shown = _test_score({k.removeprefix("metrics."): v for k, v in parent.items() if k.startswith("metrics.")})
    assert shown == f"{whole.test_value:.3f} ± {pd.Series(whole.test_values).std():.3f} (n=2)"


def test_an_interrupted_rerun_of_the_best_recipe_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    raw = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=12)], task_num=3)
    raw.update(name="tune-test", search={**SEARCH, "n_trials": 1, "pruner": {"name": "none"}})
    path = write_yaml(tmp_path / "tune.yaml", raw)
    uri, storage = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", f"journal:{tmp_path / 'optuna.journal'}"
    proc = _start_tune(path, storage, uri)
    # the trial's checkpoints come first (it is dropped when the trial ends), then the re-run's
    deadline = time.monotonic() + 300
    while not _checkpoints(tmp_path / "cache"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    (trial_run,) = _checkpoints(tmp_path / "cache")
    rerun = _interrupt_after(proc, tmp_path / "cache", signal.SIGINT, epochs=3, skip=trial_run)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    mlflow.set_tracking_uri(uri)
    assert mlflow.tracking.MlflowClient(uri).get_run(rerun).info.status == "KILLED"

    outcome = run_study(str(path), [], make_tracker(uri, "tune-test"), storage=storage, study_name="long")
    assert len(outcome.study.trials) == 1  # no trial re-run: the study had its one
    runs = mlflow.search_runs(experiment_names=["tune-test"], filter_string="tags.kind = 'best_rerun'")
    assert list(runs["run_id"]) == [rerun] and runs["status"].tolist() == ["FINISHED"]
    steps = [m.step for m in mlflow.tracking.MlflowClient(uri).get_metric_history(rerun, "epoch_train_loss")]
    assert sorted(steps) == list(range(3 * 12))  # continued, not started over


def test_the_record_counts_an_unfinished_study_in_progress_and_lists_it_once_complete(tmp_path: Path,
                                                                                      mlflow_uri: str) -> None:
    from harness.report import SEARCH_HEADER, build_report, search_lines, study_progress_lines

    raw = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=2)], task_num=3)
    raw.update(name="tune_task0", search={**SEARCH, "n_trials": 2})  # named as the record's study
    path = write_yaml(tmp_path / "tune.yaml", raw)
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    tracker = make_tracker(mlflow_uri, "tune_task0")
    part = run_study(str(path), [], tracker, storage=storage, n_trials=1)
    (line,), held = study_progress_lines(tracker)
    assert held == {part.parent_run_id[:8]}
    precision = "bf16-autocast" if native_bf16(torch.device("cpu")) else "fp32"  # how auto resolves here
    assert line.startswith(f"| tune_task0 | gem | - | `{part.parent_run_id[:8]}` | 1 of 2 trials | cpu; {precision}; ")
    assert line.endswith("| `python -m harness.tune experiments/tune_task0.yaml` |")
    assert search_lines(tracker) == []  # no result before the study has its trials and its re-run

    whole = run_study(str(path), [], tracker, storage=storage)
    assert whole.parent_run_id == part.parent_run_id and len(whole.study.trials) == 2
    assert study_progress_lines(tracker)[0] == []
    (row,) = search_lines(tracker)
    assert row.startswith(f"| tune_task0 (`{whole.parent_run_id[:8]}`) | {whole.best_value:.3f} | "
                          f"{whole.test_value:.3f} (n=1) | ")
    # the record only grows: a line from before studies named their run stays beside the new study's
    old = "| tune_task0 | 0.297 | 0.318 | {'lr': '0.0148'} | 2 | 264.409 | 02547a2c4875 |"
    record = build_report(tracker, f"## Searches\n\n{SEARCH_HEADER[0]}\n{SEARCH_HEADER[1]}\n{old}\n").text
    assert old in record.splitlines() and row in record.splitlines()
    assert "| tune_task0 | not run |" not in record
