"""Optuna studies on digits: SQLite storage, resume by name, every trial in MLflow, failures, two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest

from harness.tracking import make_tracker
from harness.tune.study import run_study
from tests.conftest import ROOT, digits_arm, digits_experiment, write_yaml

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
    from harness.tune.study import storage_of

    trials = optuna.load_study(study_name="w", storage=storage_of(storage)).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]  # split 2 + 1 over the workers, no number twice
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["tune-test"])
    assert (runs["tags.kind"] == "study").sum() == 1  # one parent, created before the workers started
    assert (runs["tags.kind"] == "best_rerun").sum() == 1
