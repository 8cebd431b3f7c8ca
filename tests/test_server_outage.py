"""A tracking server that goes away mid-run: the arm stops with one line naming what was not delivered and
keeps its checkpoint; once the server is back, ``--resume`` delivers the rest and the record is complete."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import ROOT, digits_arm, digits_experiment, free_port, mlflow_server, rest, write_yaml

EPOCHS, TASKS = 10, 5  # long enough that the run is still training when the server stops


def _server(tmp_path: Path, port: int) -> contextlib.AbstractContextManager[str]:
    return mlflow_server(["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                          str(tmp_path / "artifacts")], tmp_path, port=port)


def _mid_task_checkpoint(cache: Path) -> bool:
    for path in cache.rglob("checkpoints/last.pt"):
        try:
            loop = torch.load(path, weights_only=True)["loop"]
        except Exception:  # being replaced right now
            continue
        if loop["task"] >= 1 and loop["epoch"] >= 2:
            return True
    return False


def _metric_history(server: str, run_id: str, key: str) -> list[dict]:
    return rest(server, f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}")["metrics"]


def test_a_server_that_goes_away_mid_run_loses_nothing_after_resume(tmp_path: Path) -> None:
    port, cache = free_port(), tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HARNESS_CACHE": str(cache), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    arm = digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 32}}, epoch=EPOCHS, batch_size=8)
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([arm], task_num=TASKS))
    with _server(tmp_path, port) as server:
        proc = subprocess.Popen([sys.executable, "-m", "harness.run", str(path), "--tracking-uri", server, "--quiet"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not _mid_task_checkpoint(cache):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no mid-task checkpoint"
            time.sleep(0.05)
    # the server is gone (its process ended with the block); the run notices at its next delivery
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, err
    parent_id = out.split("parent run ")[1].split()[0]
    assert f"MLflow tracking server {server} stopped answering" in line and "not delivered to run" in line
    assert f"python -m harness.run --resume {parent_id} --tracking-uri {server}" in line
    run_id = line.split("not delivered to run ")[1].split(":")[0]
    assert (cache / "runs" / run_id / "checkpoints" / "last.pt").is_file()  # the checkpoint is kept

    with _server(tmp_path, port) as server:  # back on the same address, same store
        assert rest(server, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]["info"]["status"] == "RUNNING"
        resumed = subprocess.run([sys.executable, "-m", "harness.run", "--resume", parent_id, "--tracking-uri", server,
                                  "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        run = rest(server, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        assert run["info"]["status"] == "FINISHED"
        # every epoch's and every task's metrics arrived: nothing the outage interrupted is missing
        assert sorted(m["step"] for m in _metric_history(server, run_id, "epoch_train_loss")) == list(range(EPOCHS * TASKS))
        for task in range(TASKS):  # one row of the accuracy matrix per trained task
            assert sorted(m["step"] for m in _metric_history(server, run_id, f"cil_acc_task_{task}")) == list(range(TASKS))
        assert {m["key"] for m in run["data"]["metrics"]} >= {"task0_acc", "cil_acc", "til_acc", "wall_seconds"}
        files = {f["path"] for f in rest(server, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}")["files"]}
        assert {"accuracy_matrix.json", "arm.log", "recipe.yaml"} <= files and "checkpoints" not in files
        parent = rest(server, f"/api/2.0/mlflow/runs/get?run_id={parent_id}")["run"]
        assert parent["info"]["status"] == "FINISHED"
        assert any(m["key"] == "gem.cil_acc.mean" for m in parent["data"]["metrics"])
