"""Precision defaults (bf16 autocast and channels-last where the hardware computes bf16 natively), their
record in MLflow, bf16 inference, and torch.compile (auto: the bf16 + channels-last CPU path only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from harness.config.experiment import parse_experiment
from harness.engine.precision import Precision, choose_compile, choose_precision, native_bf16
from harness.engine.runner import auto_precision, build_split, recorded_precision
from harness.engine.trainer import ArmTrainer
from harness.run import main
from tests.conftest import ROOT, digits_arm, digits_experiment, write_yaml

CASES = [
    # amp, channels_last, device, native bf16, convolutional -> amp, channels_last, warns
    ("auto", "auto", "cuda", True, True, True, True, False),
    ("auto", "auto", "cpu", True, True, True, True, False),  # AVX-512 BF16 / AMX: the fast path
    ("auto", "auto", "cpu", False, True, False, False, False),  # emulated bf16 would be slower: fp32 stays
    ("auto", "auto", "cpu", True, False, True, False, False),  # an MLP has no use for channels-last
    (False, False, "cpu", True, True, False, False, False),  # false forces fp32
    (False, "auto", "cuda", True, True, False, True, False),
    (True, True, "cpu", False, True, True, True, True),  # forced on without native bf16: runs, warns
]


@pytest.mark.parametrize(("amp", "cl", "device", "native", "conv", "want_amp", "want_cl", "warns"), CASES)
def test_auto_selects_bf16_and_channels_last_only_where_bf16_is_native(
        amp: object, cl: object, device: str, native: bool, conv: bool, want_amp: bool, want_cl: bool,
        warns: bool) -> None:
    p = choose_precision(amp, cl, device, native, conv)
    assert (p.amp, p.channels_last) == (want_amp, want_cl)
    assert (p.warning is not None) == warns
    if warns:
        assert "slower" in p.warning and "engine.amp" in p.warning
    assert p.tags["precision"] == ("bf16-autocast" if want_amp else "fp32")


def test_native_bf16_is_pytorchs_own_onednn_check() -> None:
    assert native_bf16(torch.device("cpu")) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_the_run_records_how_it_computed(tmp_path: Path, mlflow_uri: str) -> None:
    arms = [digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=1),
            digits_arm("fp32", {"name": "finetune"}, epoch=1, engine={"amp": False})]
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment(arms, task_num=2))
    assert main([str(path), "--tracking-uri", mlflow_uri, "--quiet"]) == 0
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["digits-test"]).set_index("tags.mlflow.runName")
    native = native_bf16(torch.device("cpu"))
    assert runs.loc["gem", "tags.precision"] == ("bf16-autocast" if native else "fp32")
    assert runs.loc["fp32", "tags.precision"] == "fp32"
    assert runs.loc["gem", "tags.memory_format"] == "contiguous"  # an MLP: no channels-last
    assert runs.loc["gem", "params.engine.amp"] == "auto"


@pytest.mark.parametrize(("tags", "amp", "channels_last"), [
    ({"precision": "bf16-autocast", "memory_format": "channels_last"}, True, True),  # started on a bf16 machine
    ({"precision": "fp32", "memory_format": "contiguous"}, False, False),  # started in fp32
    ({}, "auto", "auto")])  # a run from before precision was recorded: the experiment's own setting
def test_a_resumed_arm_computes_in_the_precision_its_run_recorded(
        tmp_path: Path, tags: dict[str, str], amp: object, channels_last: object) -> None:
    arm = digits_arm("a", {"name": "finetune"}, epoch=1, backbone={"name": "resnet32"})
    experiment = parse_experiment(digits_experiment([arm], task_num=2), str(tmp_path / "exp.yaml"))
    pinned = recorded_precision(experiment.arm("a"), tags)
    assert (pinned.engine.amp, pinned.engine.channels_last) == (amp, channels_last)
    if tags:  # whatever auto would pick on this machine, the trainer computes as the run began
        trainer = ArmTrainer(pinned, build_split(experiment), None)
        assert trainer.precision.tags == tags


OTHER_MACHINE = {"fp32": {"precision": "bf16-autocast", "memory_format": "channels_last"},
                 "bf16-autocast": {"precision": "fp32", "memory_format": "contiguous"}}


@pytest.mark.parametrize("recorded_on", ["parent", "first run"])
def test_an_experiment_resumed_on_another_machine_computes_as_it_started(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], recorded_on: str) -> None:
    """``auto`` resolves once, where the experiment starts: an arm run that begins when the experiment is
    resumed on a machine of the other kind computes as the experiment's first runs did. The parent records
    the resolution; a parent recorded before that is read through its first run's tags."""
    arms = [digits_arm(name, {"name": "finetune"}, epoch=1, backbone={"name": "resnet32"}) for name in ("a", "b")]
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment(arms, task_num=2))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([str(path), "--tracking-uri", uri, "--quiet"]) == 0
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("digits-test").experiment_id
    parent = client.search_runs([exp_id], "tags.kind = 'experiment'")[0]
    runs = {r.data.tags["arm"]: r for r in client.search_runs([exp_id], "tags.arm != ''")}
    here = auto_precision("auto")
    assert {k: parent.data.tags[f"auto_{k}"] for k in here} == here == {k: runs["a"].data.tags[k] for k in here}

    # The experiment started on the other kind of machine, and was stopped before arm b began.
    other = OTHER_MACHINE[here["precision"]]
    pid = parent.info.run_id
    if recorded_on == "parent":
        for key, value in other.items():
            client.set_tag(pid, f"auto_{key}", value)
    else:
        for key, value in other.items():
            client.delete_tag(pid, f"auto_{key}")
            client.set_tag(runs["a"].info.run_id, key, value)
    client.delete_run(runs["b"].info.run_id)
    client.set_terminated(pid, "KILLED")
    capsys.readouterr()
    assert main(["--resume", pid, "--tracking-uri", uri, "--quiet"]) == 0
    assert f"arm runs that begin now compute in {other['precision']}, {other['memory_format']}" in capsys.readouterr().out
    b = [r for r in client.search_runs([exp_id], "tags.arm = 'b'")]
    assert len(b) == 1 and b[0].info.run_id != runs["b"].info.run_id and b[0].info.status == "FINISHED"
    assert {k: b[0].data.tags[k] for k in other} == other  # computed as the experiment started
    assert b[0].data.params["engine.amp"] == "auto"  # the recipe as written: its row stays that of run a


def _trainer(tmp_path: Path, **engine: object) -> ArmTrainer:
    arm = digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=8, backbone={"name": "resnet32"},
                     batch_size=64, optimizer={"name": "SGD", "kwargs": {"lr": 0.02, "momentum": 0.9}}, engine=engine)
    experiment = parse_experiment(digits_experiment([arm], task_num=2), str(tmp_path / "exp.yaml"))
    return ArmTrainer(experiment.arm("gem"), build_split(experiment), None)


def test_bf16_channels_last_training_and_inference_agree_with_fp32(tmp_path: Path) -> None:
    """A convolutional arm in bf16 + channels-last learns as well as in fp32; its evaluation and NME class
    means run in bf16 too, on inputs in the network's channels-last layout."""
    fast = _trainer(tmp_path, amp=True, channels_last=True)
    assert fast.net.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    inputs = fast.ctx.eval_transform(fast.ctx.train_images[:4], train=False)
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    bf16 = fast.fit()
    fp32 = _trainer(tmp_path, amp=False, channels_last=False).fit()
    for result in (bf16, fp32):
        assert result.matrices["til"][-1].mean() > 0.75  # 2-way tasks: chance is 0.5
        assert result.matrices["nme_cil"][-1].mean() > 0.5  # 4 classes seen: chance is 0.25
    assert abs(bf16.matrices["til"][-1].mean() - fp32.matrices["til"][-1].mean()) < 0.1


BF16_CL, FP32 = Precision(amp=True, channels_last=True), Precision(amp=False, channels_last=False)
COMPILE_CASES = [
    # compile, precision, device, native bf16, convolutional -> compiled
    ("auto", BF16_CL, "cpu", True, True, True),  # the bf16 + channels-last CPU path: measured faster compiled
    ("auto", FP32, "cpu", False, True, False),  # fp32 on an AVX2 CPU: the measurements were mixed
    ("auto", FP32, "cpu", True, True, False),  # fp32 forced on a bf16 CPU
    ("auto", BF16_CL, "cpu", True, False, False),  # an MLP
    ("auto", BF16_CL, "cuda", True, True, False),  # CUDA: the step is a CUDA graph
    (True, FP32, "cpu", False, False, True),
    (False, BF16_CL, "cpu", True, True, False),
]


@pytest.mark.parametrize(("setting", "precision", "device", "native", "conv", "want"), COMPILE_CASES)
def test_auto_compiles_only_the_bf16_channels_last_cpu_path(setting: object, precision: Precision, device: str,
                                                            native: bool, conv: bool, want: bool) -> None:
    assert choose_compile(setting, precision, device, native, conv) is want


def test_compile_trains_like_eager_and_the_run_records_it(tmp_path: Path, mlflow_uri: str) -> None:
    arm = digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=2, engine={"amp": False})
    raw = digits_experiment([arm, {**arm, "name": "compiled", "engine": {"amp": False, "compile": True}}], task_num=2)
    experiment = parse_experiment(raw, "exp.yaml")
    split = build_split(experiment)
    plain = ArmTrainer(experiment.arm("gem"), split, None)
    assert experiment.arm("gem").engine.compile == "auto" and not plain.compiled  # fp32: auto stays eager
    eager = plain.fit()
    compiled = ArmTrainer(experiment.arm("compiled"), split, None).fit()
    assert np.allclose(eager.matrices["til"], compiled.matrices["til"], atol=0.03)

    path = write_yaml(tmp_path / "exp.yaml", {**raw, "arms": [{**arm, "epoch": 1}, {**raw["arms"][1], "epoch": 1}]})
    assert main([str(path), "--tracking-uri", mlflow_uri, "--quiet"]) == 0
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["digits-test"]).set_index("tags.mlflow.runName")
    assert runs.loc["gem", "tags.compiled"] == "false" and runs.loc["compiled", "tags.compiled"] == "true"


def _one_line_exit_2(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "harness.run", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_precision_and_compile_settings_exit_2_naming_the_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)]))
    assert "engine.amp" in _one_line_exit_2([str(path), "engine.amp=maybe"], tmp_path)
    err = _one_line_exit_2([str(path), "engine.compile=true"], tmp_path, {"CXX": "/nonexistent/c++"})
    assert "engine.compile" in err and "compiler" in err
    assert not (tmp_path / "mlruns").exists()  # stopped before anything was recorded
