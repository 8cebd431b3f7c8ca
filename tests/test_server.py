"""A team's setup: a real `mlflow server` on loopback, backed by PostgreSQL, receiving a 2-arm experiment and
a 2-worker study at once; everything is checked through the server's REST API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, digits_arm, digits_experiment, write_yaml

POSTGRES = os.environ.get("HARNESS_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not POSTGRES, reason="set HARNESS_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    import psycopg

    name = f"mlflow_{os.getpid()}_{tmp_path.name[-6:]}".replace("-", "_")
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    backend = POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "2"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


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
                   _api(server, "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]}
    runs = _api(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiments["team-exp"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    arm_runs = [r for r, t in zip(runs, tags, strict=True) if t.get("kind") != "experiment"]
    assert sorted(t["arm"] for t in tags if t.get("kind") != "experiment") == ["finetune", "gem"]
    for run in arm_runs:
        assert run["info"]["status"] == "FINISHED"
        assert {m["key"] for m in run["data"]["metrics"]} >= {"task0_acc", "cil_acc", "cil_acc_task_1", "wall_seconds"}
        listed = _api(server, f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}")
        assert {f["path"] for f in listed["files"]} >= {"recipe.yaml", "accuracy_matrix.json", "arm.log"}

    trials = _api(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiments["team-study"]],
                                                          "filter": "tags.kind = 'trial'"})["runs"]
    numbers = sorted(int(next(t["value"] for t in r["data"]["tags"] if t["key"] == "trial")) for r in trials)
    assert numbers == [0, 1, 2, 3]  # every trial arrived, no trial number twice
