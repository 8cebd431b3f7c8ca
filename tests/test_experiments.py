"""Every experiment file the project ships validates, with each of its variants, and runs end to end as a
smoke run (every arm, every summary metric, every artifact)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from harness.config.experiment import load_experiment
from harness.config.loader import read_yaml
from harness.run import main
from tests.conftest import ROOT, SHARED_DATA

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_file_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    monkeypatch.chdir(ROOT)  # data_root paths are relative to the project root
    for variant in [None, *(read_yaml(path).get("variants") or {})]:
        experiment = load_experiment(path, [], variant)
        assert experiment.arms and experiment.split.task_num >= 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_smoke_run_records_every_arm_metric_and_artifact(path: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    monkeypatch.chdir(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([str(path), "--smoke", "--tracking-uri", uri, "--quiet"]) == 0
    experiment = load_experiment(path)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment.tracking.experiment or experiment.name])
    arms = runs[runs["tags.kind"] != "experiment"]
    assert sorted(arms["tags.arm"]) == sorted(a.name for a in experiment.arms)  # one seed each
    assert (arms["status"] == "FINISHED").all()
    for metric in ("task0_acc", "cil_acc", "til_acc", "cil_avg_incremental", "wall_seconds"):
        assert arms[f"metrics.{metric}"].notna().all(), metric
    client = MlflowClient(uri)
    for run_id in arms["run_id"]:
        assert {a.path for a in client.list_artifacts(run_id)} >= {"recipe.yaml", "accuracy_matrix.json", "arm.log",
                                                                   "accuracy_matrix.png", "accuracy_curve.png"}
    parent = runs[runs["tags.kind"] == "experiment"]["run_id"].iloc[0]
    assert {"comparison.csv", "arms_cil.png"} <= {a.path for a in client.list_artifacts(parent)}
