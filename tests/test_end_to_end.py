"""Whole experiments through ``python -m harness.run``, read back from a temporary MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from harness.run import main
from tests.conftest import CIFAR100, digits_arm, digits_experiment, needs_cifar, write_yaml

SUMMARY = ["task0_acc", "cil_acc", "cil_bwt", "cil_fwt", "cil_forgetting", "cil_avg_incremental", "til_acc", "til_bwt",
           "til_fwt", "til_forgetting", "til_avg_incremental", "cil_bwt_code", "cil_fwt_code", "wall_seconds"]
ARTIFACTS = {"recipe.yaml", "accuracy_matrix.json", "accuracy_matrix.png", "accuracy_curve.png", "arm.log"}


def arm_runs(uri: str, experiment: str) -> mlflow.pandas.DataFrame:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment])
    return runs[runs["tags.kind"] != "experiment"].set_index("tags.arm")


def test_digits_experiment_is_fully_recorded_in_mlflow(tmp_path: Path, mlflow_uri: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    arms = [digits_arm("finetune", {"name": "finetune"}), digits_arm("joint", {"name": "joint"}),
            digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 32}})]
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment(arms))
    assert main([str(path), "--tracking-uri", mlflow_uri, "--quiet"]) == 0
    out = capsys.readouterr().out
    parent_id = out.split("parent run ")[1].split()[0]
    assert "finetune" in out and "cil_bwt" in out  # the side-by-side table

    runs = arm_runs(mlflow_uri, "digits-test")
    assert set(runs.index) == {"finetune", "joint", "gem"}
    assert (runs["tags.mlflow.parentRunId"] == parent_id).all()
    assert (runs["status"] == "FINISHED").all()
    assert runs["tags.split_hash"].nunique() == 1  # every arm on the identical split
    for metric in SUMMARY:
        assert runs[f"metrics.{metric}"].notna().all(), metric
    for j in range(5):
        assert runs[f"metrics.cil_acc_task_{j}"].notna().all()
    assert runs.loc["finetune", "metrics.cil_bwt"] < -0.5  # finetune forgets
    assert runs.loc["joint", "metrics.cil_bwt"] > -0.1  # joint does not
    assert runs.loc["gem", "metrics.nme_cil_acc"] > 0
    assert runs.loc["gem", "params.method.kwargs.n_memories"] == "32"
    assert runs.loc["gem", "params.split.class_order_resolved"] == str(list(range(10)))

    client = MlflowClient(mlflow_uri)
    # laid out for training runs: mlflow ui's model-training kind, the file's note, the headline columns view
    tags = client.get_experiment_by_name("digits-test").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.harness"])
    assert view["selectedColumns"][:2] == ["metrics.`task0_acc`", "metrics.`cil_acc`"]
    # one row per arm (its seeds averaged), by the tag every arm's run carries
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "arm"}]
    assert runs.index.notna().all()
    assert "viewStateShareKey=harness&workflowType=machine_learning" in out
    gem_id = runs.loc["gem", "run_id"]
    assert {a.path for a in client.list_artifacts(gem_id)} == ARTIFACTS
    matrix = json.loads(Path(client.download_artifacts(gem_id, "accuracy_matrix.json", str(tmp_path))).read_text())
    cil = np.array(matrix["cil"])
    assert cil.shape == (5, 5) and ((cil >= 0) & (cil <= 1)).all()
    assert cil[-1].mean() == pytest.approx(runs.loc["gem", "metrics.cil_acc"])
    history = client.get_metric_history(gem_id, "cil_acc_task_0")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert len(client.get_metric_history(gem_id, "epoch_train_loss")) == 5 * 4  # 5 tasks x 4 epochs
    task_seconds = [m.value for m in client.get_metric_history(gem_id, "task_seconds")]
    assert len(task_seconds) == 5 and sum(task_seconds) == pytest.approx(runs.loc["gem", "metrics.wall_seconds"])
    fractions = client.get_metric_history(gem_id, "gem_projection_fraction")
    assert len(fractions) == 5 and all(0 <= m.value <= 1 for m in fractions)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"comparison.csv", "experiment_resolved.yaml",
                                                                  "arms_cil.png"}


def test_tracking_none_writes_the_same_record_to_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm("ft", {"name": "finetune"}, epoch=1)]))
    assert main([str(path), "--tracking-uri", "none", "--quiet"]) == 0
    runs = [p.parent for p in (tmp_path / "harness_runs" / "digits-test").glob("*/meta.json")]
    arm = next(r for r in runs if json.loads((r / "tags.json").read_text()).get("arm") == "ft")
    keys = {json.loads(line)["key"] for line in (arm / "metrics.jsonl").read_text().splitlines()}
    assert {"cil_acc", "til_bwt", "task0_acc", "epoch_train_loss", "cil_acc_task_4"} <= keys
    assert json.loads((arm / "params.json").read_text())["method.name"] == "finetune"
    assert {p.name for p in (arm / "artifacts").iterdir()} == ARTIFACTS
    assert json.loads((arm / "meta.json").read_text())["status"] == "FINISHED"


@needs_cifar
def test_cifar100_subset_runs_on_cpu(tmp_path: Path, mlflow_uri: str) -> None:
    """Two tasks of two CIFAR-100 classes (PyCIL order), ResNet-32 with PyCIL's augmentation, one epoch."""
    arms = [{"name": "gem", "method": {"name": "gem", "kwargs": {"n_memories": 16, "memory_fill": "herding"}},
             "backbone": {"name": "resnet32"}, "epoch": 1, "batch_size": 64,
             "optimizer": {"name": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
             "augment": {"crop": 4, "flip": True, "brightness": 0.247}}]
    raw = digits_experiment(arms, dataset="cifar100", data_root=str(CIFAR100), class_order="seed:1993",
                            init_cls_num=2, inc_cls_num=2, task_num=2)
    path = write_yaml(tmp_path / "cifar.yaml", raw)
    assert main([str(path), "--tracking-uri", mlflow_uri, "--quiet"]) == 0
    runs = arm_runs(mlflow_uri, "digits-test")
    gem = runs.loc["gem"]
    assert gem["params.split.class_order_resolved"].startswith("[68, 56, 78, 8]")
    assert 0.4 <= gem["metrics.task0_acc"] <= 1.0  # two classes after one epoch: above chance
    assert gem["metrics.til_acc"] >= 0.4


def test_reproduction_report_reads_runs_back_from_mlflow(tmp_path: Path, mlflow_uri: str) -> None:
    from harness.report import main as report

    raw = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=1)], task_num=2)
    raw["name"] = "gem_vs_pycil"  # recorded under the name the report looks for
    assert main([str(write_yaml(tmp_path / "exp.yaml", raw)), "--tracking-uri", mlflow_uri, "--quiet"]) == 0
    output = tmp_path / "docs" / "REPRODUCTION.md"
    assert report(["--tracking-uri", mlflow_uri, "--out", str(output)]) == 0
    text = output.read_text()
    gem_row = next(line for line in text.splitlines() if line.startswith("| gem_vs_pycil | gem |"))
    task0 = arm_runs(mlflow_uri, "gem_vs_pycil").loc["gem", "metrics.task0_acc"]
    assert f"task-0 {task0:.3f}" in gem_row and "CPU; " in gem_row and "; full size" in gem_row
    assert "| gem_vs_pycil | pycil_gem |" in text and "| seed_recipe | seed_recipe |" in text
    assert "| tune_task0 | not run |" in text
    plots = list((output.parent / "reproduction").glob("gem_vs_pycil-*.png"))
    assert len(plots) == 1 and plots[0].name in text

    # An arm that finished stays in the record when its experiment is later interrupted.
    parent = arm_runs(mlflow_uri, "gem_vs_pycil").loc["gem", "tags.mlflow.parentRunId"]
    MlflowClient(mlflow_uri).set_terminated(parent, "KILLED")
    assert report(["--tracking-uri", mlflow_uri, "--out", str(output)]) == 0
    gem_row = next(line for line in output.read_text().splitlines() if line.startswith("| gem_vs_pycil | gem |"))
    assert f"task-0 {task0:.3f}" in gem_row and "experiment killed" in gem_row

    # Another command, another seed of the same recipe: one row of two seeds, and each run keeps its plot.
    assert main([str(tmp_path / "exp.yaml"), "--tracking-uri", mlflow_uri, "--quiet", "--seeds", "5"]) == 0
    assert report(["--tracking-uri", mlflow_uri, "--out", str(output)]) == 0
    text = output.read_text()
    gem_rows = [line for line in text.splitlines() if line.startswith("| gem_vs_pycil | gem |")]
    assert len(gem_rows) == 1 and "(n=2)" in gem_rows[0]
    plots = list((output.parent / "reproduction").glob("gem_vs_pycil-*.png"))
    assert len(plots) == 2 and all(f"reproduction/{plot.name}" in text for plot in plots)
