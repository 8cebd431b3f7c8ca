"""Interrupted runs resume exactly; bad inputs fail with one line and exit code 2; nothing finished is lost."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from harness.config.experiment import parse_experiment
from harness.engine.runner import build_split
from harness.engine.session import changed_keys
from harness.engine.trainer import ArmTrainer, load_checkpoint, save_checkpoint
from harness.errors import UserError
from harness.run import main
from tests.conftest import CIFAR100, MNIST, ROOT, digits_arm, digits_experiment, expect_exit_2, needs_cifar, write_yaml

ARMS = [digits_arm("finetune", {"name": "finetune"}, epoch=2),
        digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 32}}, epoch=5, batch_size=8),
        digits_arm("joint", {"name": "joint"}, epoch=2)]


def matrices(uri: str, experiment: str, parent_id: str) -> dict[str, dict]:
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    out = {}
    for _, run in runs.iterrows():
        folder = Path(client.download_artifacts(run["run_id"], "accuracy_matrix.json"))
        out[(run["tags.arm"], run["tags.seed"])] = {"matrix": json.loads(folder.read_text()), "status": run["status"],
                                                    "run_id": run["run_id"]}
    return out


def _checkpoint_mid_task(store: Path) -> bool:
    """The GEM arm (5 tasks of 5 epochs) has a checkpoint from the middle of task 2, 3 or 4."""
    for path in store.rglob("checkpoints/last.pt"):
        try:
            state = torch.load(path, weights_only=True)
        except Exception:  # a checkpoint being replaced right now
            continue
        is_gem = "memory" in state["method"]  # finetune's checkpoints carry no method state
        if is_gem and 2 <= state["loop"]["task"] <= 4 and state["loop"]["epoch"] >= 1:
            return True
    return False


def _start(path: Path, uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "harness.run", str(path), "--tracking-uri", uri, "--quiet"],
                            cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_mid_gem_task(proc: subprocess.Popen, store: Path, sig: int) -> None:
    deadline = time.monotonic() + 300
    while not _checkpoint_mid_task(store):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no mid-task checkpoint"
        time.sleep(0.02)
    proc.send_signal(sig)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_experiment_resumes_to_the_same_result(tmp_path: Path, sig: int, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # where the runs' checkpoints go
    path = write_yaml(tmp_path / "exp.yaml", {**digits_experiment(ARMS), "seeds": [0, 5]})
    reference_uri = f"sqlite:///{tmp_path / 'ref' / 'mlflow.db'}"
    assert main([str(path), "--tracking-uri", reference_uri, "--quiet"]) == 0
    reference_parent = MlflowClient(reference_uri).search_runs(
        [MlflowClient(reference_uri).get_experiment_by_name("digits-test").experiment_id],
        "tags.kind = 'experiment'")[0].info.run_id

    store = tmp_path / "int"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    proc = _start(path, uri)
    _interrupt_mid_gem_task(proc, tmp_path / "cache", sig)
    out, err = proc.communicate(timeout=120)
    parent_id = out.split("parent run ")[1].split()[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and f"continue with: python -m harness.run --resume {parent_id}" in err
        assert MlflowClient(uri).get_run(parent_id).info.status == "KILLED"
    else:
        assert proc.returncode == -signal.SIGKILL
    before = {(r.data.tags["arm"], r.data.tags["seed"]): r for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}
    # arms run seed by seed: both finetune seeds finished, GEM was stopped in one of its seeds, joint never began
    assert before["finetune", "0"].info.status == before["finetune", "5"].info.status == "FINISHED"
    assert not any(arm == "joint" for arm, _ in before)
    stopped = [key for key in before if key[0] == "gem" and before[key].info.status != "FINISHED"]
    assert len(stopped) == 1
    gem = before[stopped[0]]
    if sig == signal.SIGINT:  # a SIGKILL gives the process no chance to mark its run
        assert gem.info.status == "KILLED"
    assert "harness.run --resume" in gem.data.tags["resume_hint"]
    # the tasks finished before the interruption are already in MLflow
    assert len(MlflowClient(uri).get_metric_history(gem.info.run_id, "cil_acc_task_0")) >= 2

    # the stopped arm's checkpoint is in its run's artifacts as well as in this machine's cache
    assert [a.path for a in MlflowClient(uri).list_artifacts(gem.info.run_id, "checkpoints")] == ["checkpoints/last.pt"]
    if sig == signal.SIGKILL:  # and the SIGKILLed experiment resumes on a fresh machine, from the record alone
        shutil.rmtree(tmp_path / "cache")
    capsys.readouterr()
    assert main(["--resume", parent_id, "--tracking-uri", uri]) == 0
    # the progress total leaves out the finished arms and the checkpointed epochs: the last line is N/N, so
    # the ETA along the way counted only what the resume had left to run
    done, total = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")][-1][1:].split()[0].split("/")
    assert done == total, (done, total)
    resumed = matrices(uri, "digits-test", parent_id)
    reference = matrices(reference_uri, "digits-test", reference_parent)
    assert set(resumed) == {(arm, seed) for arm in ("finetune", "gem", "joint") for seed in ("0", "5")}
    assert resumed[stopped[0]]["run_id"] == gem.info.run_id  # same run, continued
    assert resumed["finetune", "5"]["run_id"] == before["finetune", "5"].info.run_id  # kept, not retrained
    for arm in resumed:
        assert resumed[arm]["status"] == "FINISHED"
        assert resumed[arm]["matrix"] == reference[arm]["matrix"], arm  # exact equality
    assert MlflowClient(uri).get_run(parent_id).info.status == "FINISHED"
    for arm in resumed:  # finished arms drop the checkpoint from their artifacts
        assert MlflowClient(uri).list_artifacts(resumed[arm]["run_id"], "checkpoints") == []
    log = Path(MlflowClient(uri).download_artifacts(gem.info.run_id, "arm.log", str(tmp_path))).read_text()
    assert "gem task 1/5 epoch 1/5" in log and "gem task 5/5 epoch 5/5" in log  # one log across the interruption
    steps = [m.step for m in MlflowClient(uri).get_metric_history(gem.info.run_id, "epoch_train_loss")]
    assert sorted(steps) == list(range(5 * 5))  # one curve across the interruption: each epoch once


def _expect_exit_2(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    return expect_exit_2(main, args, capsys, *needles)


def test_resume_refuses_a_changed_experiment_file_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    # a run that diverges at once leaves a resumable parent; then the file is edited
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm(
        "a", {"name": "finetune"}, epoch=1, optimizer={"name": "SGD", "kwargs": {"lr": 1e12}})]))
    err = _expect_exit_2([str(path), "--tracking-uri", uri, "--quiet"], capsys, "non-finite loss", "arm 'a'", "task 0",
                         "epoch 0", "step")
    assert "last good checkpoint" in err
    parent = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("digits-test").experiment_id],
                                           "tags.kind = 'experiment'")[0]
    assert parent.info.status == "FAILED"
    write_yaml(path, digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=2)]))
    _expect_exit_2(["--resume", parent.info.run_id, "--tracking-uri", uri], capsys, "changed since run",
                   "arms.a.epoch", "arms.a.optimizer.kwargs.lr", "--force")
    assert main(["--resume", parent.info.run_id, "--tracking-uri", uri, "--force", "--quiet"]) == 0
    assert "--force: arm runs that begin now follow the changed keys (arms.a.epoch" in capsys.readouterr().out
    # the parent records what the force let through: the keys, and the file as it was before
    client = MlflowClient(uri)
    (change,) = json.loads(client.get_run(parent.info.run_id).data.tags["forced_changes"])
    assert {"arms.a.epoch", "arms.a.optimizer.kwargs.lr"} <= set(change["keys"])
    before = yaml.safe_load(Path(client.download_artifacts(
        parent.info.run_id, f"forced/{change['at']}/experiment_resolved.yaml", str(tmp_path / "before"))).read_text())
    now = yaml.safe_load(Path(client.download_artifacts(
        parent.info.run_id, "experiment_resolved.yaml", str(tmp_path / "now"))).read_text())
    assert (before["arms"][0]["epoch"], now["arms"][0]["epoch"]) == (1, 2)
    _expect_exit_2(["--resume", parent.info.run_id, "--tracking-uri", uri], capsys, "already finished")
    _expect_exit_2(["--resume", "0123456789abcdef", "--tracking-uri", uri], capsys, "no run")


def test_changed_keys_count_only_the_arms_a_parent_trains() -> None:
    """Arms are addressed by name, dots in names included; an arm added to the file of an experiment started
    with --arms changes none of its runs."""
    before = {"split": {"seed": 1}, "arms": [{"name": "a", "epoch": 1}, {"name": "m_0.9", "epoch": 2}]}
    after = {"split": {"seed": 2},
             "arms": [{"name": "a", "epoch": 1}, {"name": "m_0.9", "epoch": 3}, {"name": "m_0.95", "epoch": 1}]}
    assert changed_keys(before, after) == ["arms.m_0.9.epoch", "arms.m_0.95.epoch", "arms.m_0.95.name", "split.seed"]
    assert changed_keys(before, after, ["a"]) == ["split.seed"]
    assert changed_keys(before, after, ["m_0.9"]) == ["arms.m_0.9.epoch", "split.seed"]


def test_checkpoints_load_weights_only_and_a_malicious_file_is_never_executed(tmp_path: Path) -> None:
    state = {"loop": {"task": 1}, "net": {"w": torch.ones(3)}, "rng": {"python": (3, tuple(range(5)), None)}}
    save_checkpoint(state, tmp_path)
    assert torch.equal(load_checkpoint(tmp_path)["net"]["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "last.pt", "wb") as f:
        pickle.dump({"loop": Payload()}, f)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    (tmp_path / "last.pt").write_bytes(b"\x00truncated")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path)


def test_unwritable_checkpoint_folder_and_mlflow_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="checkpoint folder is not writable"):
        save_checkpoint({"x": 1}, blocker / "checkpoints")
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)]))
    _expect_exit_2([str(path), "--tracking-uri", f"sqlite:///{blocker}/mlflow.db"], capsys, str(blocker),
                   "MLflow store is not writable")
    _expect_exit_2([str(path), "--tracking-uri", "none", "tracking.local_dir=" + str(blocker / "runs")], capsys,
                   "cannot create the run folder")


def test_truncated_mnist_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for f in (MNIST / "MNIST" / "raw").iterdir():
        shutil.copy(f, raw_dir / f.name)
    labels = raw_dir / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:5000])
    raw = digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)], dataset="mnist", data_root=str(tmp_path))
    path = write_yaml(tmp_path / "exp.yaml", raw)
    _expect_exit_2([str(path), "--dry-run"], capsys, str(labels), "truncated")


def test_missing_mnist_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    raw = digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)], dataset="mnist", data_root=str(tmp_path))
    path = write_yaml(tmp_path / "exp.yaml", raw)
    _expect_exit_2([str(path), "--dry-run"], capsys, "missing MNIST file")


def test_corrupt_cifar_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"\x80\x04garbage")
    (folder / "test").write_bytes(b"")
    raw = digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)], dataset="cifar100",
                            data_root=str(tmp_path), init_cls_num=20, inc_cls_num=20)
    path = write_yaml(tmp_path / "exp.yaml", raw)
    _expect_exit_2([str(path), "--dry-run"], capsys, str(folder / "train"), "corrupt CIFAR file")


@needs_cifar
def test_corrupt_image_and_missing_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = sorted(p.name for p in (CIFAR100 / "train").iterdir())
    for split in ("train", "test"):
        for name in names[:2]:
            shutil.copytree(CIFAR100 / split / name, tmp_path / split / name)
        for name in names[2:]:
            (tmp_path / split / name).mkdir(parents=True)
    broken = tmp_path / "train" / names[1] / "99999.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    raw = digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)], dataset="cifar100",
                            data_root=str(tmp_path), class_order=list(range(100)), init_cls_num=1, inc_cls_num=1,
                            task_num=2)
    path = write_yaml(tmp_path / "exp.yaml", raw)
    _expect_exit_2([str(path), "--dry-run"], capsys, str(broken), "cannot decode image")
    broken.unlink()
    shutil.rmtree(tmp_path / "test" / names[0])
    _expect_exit_2([str(path), "--dry-run"], capsys, names[0], "missing class folder")
    shutil.rmtree(tmp_path / "train" / names[5])
    _expect_exit_2([str(path), "--dry-run"], capsys, "99 class folders")


class _Stop(Exception):
    """Raised from the epoch callback: the trainer stops as if the process had died there."""


@pytest.mark.parametrize("method", [{"name": "pycil_gem", "kwargs": {"memory_size": 40}},
                                    {"name": "gem", "kwargs": {"n_memories": 16, "memory_fill": "herding"}}],
                         ids=["pycil_gem", "gem_herding"])
@pytest.mark.parametrize("stop_at", [(1, 1), (1, 0)], ids=["mid_task", "task_boundary"])
def test_resume_continues_methods_that_change_weights_when_a_task_starts(
        tmp_path: Path, method: dict, stop_at: tuple[int, int]) -> None:
    """pycil_gem re-initialises the new task's head rows and re-augments its memory when a task starts; a
    resume must take both from the checkpoint instead (mid-task) or redo them exactly once (at a boundary)."""
    experiment = parse_experiment(digits_experiment([digits_arm("a", method, epoch=3)], task_num=3), "t.yaml")
    split = build_split(experiment)
    reference = ArmTrainer(experiment.arm("a"), split, None).fit()

    def stop(trainer: ArmTrainer, task: int, epoch: int) -> None:
        if (task, epoch) == stop_at:  # the checkpoint before this epoch's end is the last one written
            raise _Stop

    folder = tmp_path / "checkpoints"
    with pytest.raises(_Stop):
        ArmTrainer(experiment.arm("a"), split, None, on_epoch=stop, checkpoint_dir=folder).fit()
    resumed = ArmTrainer(experiment.arm("a"), split, None, checkpoint_dir=folder).fit(load_checkpoint(folder))
    for name, matrix in reference.matrices.items():
        np.testing.assert_array_equal(resumed.matrices[name], matrix, err_msg=name)


def test_an_unreachable_tracking_server_stops_before_training_naming_the_uri(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a loopback port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)]))
    started = time.monotonic()
    _expect_exit_2([str(path), "--tracking-uri", f"http://127.0.0.1:{port}", "--quiet"], capsys,
                   f"http://127.0.0.1:{port}", "unreachable")
    assert time.monotonic() - started < 60  # a bounded retry, not MLflow's minutes of backoff


def test_resume_finds_the_experiment_file_in_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent recorded in another work tree (a later session's fresh checkout) resumes from this one's file."""
    from harness.engine.session import experiment_file

    monkeypatch.chdir(ROOT)
    moved = {"experiment_file": "/gone/worktree/experiments/quickstart.yaml"}
    assert experiment_file(moved) == Path("experiments/quickstart.yaml")
    with pytest.raises(UserError, match="experiment file of this run is gone"):
        experiment_file({"experiment_file": "/gone/nowhere.yaml"})
