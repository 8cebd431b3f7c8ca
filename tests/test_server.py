"""A team's setup: a real `mlflow server` on loopback, backed by PostgreSQL, receiving a 2-arm experiment and
a 2-worker study at once; everything is checked through the server's REST API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, digits_arm, digits_experiment, mlflow_server, rest, write_yaml

POSTGRES = os.environ.get("HARNESS_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not POSTGRES, reason="set HARNESS_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    import psycopg

    name = f"mlflow_{os.getpid()}_{tmp_path.name[-6:]}".replace("-", "_")
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    backend = POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    with mlflow_server(["--backend-store-uri", backend, "--artifacts-destination", str(tmp_path / "artifacts"),
                        "--workers", "2"], tmp_path) as base:
        yield base


def test_an_experiment_and_a_two_worker_study_reach_a_shared_tracking_server(tmp_path: Path, server: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    arms = [digits_arm("finetune", {"name": "finetune"}, epoch=1), digits_arm("gem", {"name": "gem", "kwargs":
                                                                                  {"n_memories": 16}}, epoch=1)]
    experiment = write_yaml(tmp_path / "exp.yaml", {**digits_experiment(arms, task_num=2), "name": "team-exp"})
    study = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=1)], task_num=2)
    study.update(name="team-study", search={"arm": "gem", "objective": "cil_acc", "n_trials": 4, "val_fraction": 0.2,
                                            "space": {"lr": {"log_uniform": [0.01, 0.3]}}})
    tune = write_yaml(tmp_path / "tune.yaml", study)
    procs = [subprocess.Popen([sys.executable, "-m", "harness.run", str(experiment), "--tracking-uri", server,
                               "--quiet"], cwd=tmp_path, env=env),
             subprocess.Popen([sys.executable, "-m", "harness.tune", str(tune), "--tracking-uri", server, "--workers",
                               "2", "--storage", POSTGRES, "--study", f"team-{os.getpid()}-{time.time_ns()}", "--quiet"],
                              cwd=tmp_path, env=env)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]

    experiments = {e["name"]: e["experiment_id"] for e in
                   rest(server, "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]}
    runs = rest(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiments["team-exp"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    arm_runs = [r for r, t in zip(runs, tags, strict=True) if t.get("kind") != "experiment"]
    assert sorted(t["arm"] for t in tags if t.get("kind") != "experiment") == ["finetune", "gem"]
    for run in arm_runs:
        assert run["info"]["status"] == "FINISHED"
        assert {m["key"] for m in run["data"]["metrics"]} >= {"task0_acc", "cil_acc", "cil_acc_task_1", "wall_seconds"}
        listed = rest(server, f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}")
        assert {f["path"] for f in listed["files"]} >= {"recipe.yaml", "accuracy_matrix.json", "arm.log"}

    trials = rest(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiments["team-study"]],
                                                          "filter": "tags.kind = 'trial'"})["runs"]
    numbers = sorted(int(next(t["value"] for t in r["data"]["tags"] if t["key"] == "trial")) for r in trials)
    assert numbers == [0, 1, 2, 3]  # every trial arrived, no trial number twice
