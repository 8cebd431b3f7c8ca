"""Shared fixtures: a temporary MLflow store, the real data folders, small experiment files."""

from __future__ import annotations

import contextlib
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
import yaml

from harness.config.experiment import parse_experiment
from harness.engine.progress import Progress
from harness.engine.runner import build_split
from harness.engine.trainer import ArmTrainer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HARNESS_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR100 = SHARED_DATA / "cifar100"
MNIST = SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded-image caches go to a per-session folder, never next to the shared data."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def digits_arm(name: str, method: dict, epoch: int = 4, **extra: object) -> dict:
    return {"name": name, "method": method, "backbone": {"name": "mlp", "kwargs": {"hidden": [64, 64]}},
            "epoch": epoch, "batch_size": 32, "optimizer": {"name": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9}},
            "augment": False, **extra}


def digits_experiment(arms: list[dict], **split: object) -> dict:
    return {"name": "digits-test",
            "split": {"dataset": "digits", "class_order": "label", "init_cls_num": 2, "inc_cls_num": 2,
                      "task_num": 5, "seed": 0, **split},
            "engine": {"device": "cpu", "deterministic": True},
            "arms": arms}


def digits_trainer(arms: list[dict], arm: str, progress: Progress | None = None, **split: object) -> ArmTrainer:
    """The trainer of arm ``arm`` of a digits experiment with these arms (no tracking)."""
    experiment = parse_experiment(digits_experiment(arms, **split), "test.yaml")
    return ArmTrainer(experiment.arm(arm), build_split(experiment), None, progress)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


needs_cifar = pytest.mark.skipif(not (CIFAR100 / "train").is_dir(), reason=f"CIFAR-100 not found at {CIFAR100}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(base: str, path: str, body: dict | None = None) -> dict:
    """A JSON call to a tracking server's REST API (POST when ``body`` is given)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def mlflow_server(args: list[str], cwd: Path, env: dict[str, str] | None = None, port: int | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on a loopback port (a free one unless given), up once its health check
    answers; yields its URL."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args, "--host", "127.0.0.1", "--port", str(port)],
                            cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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


def expect_exit_2(main: object, args: list[str], capsys: object, *needles: str) -> str:
    """``main(args)`` exits 2 with one line on stderr, no traceback, containing every needle."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err
