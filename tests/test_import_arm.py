"""Bring your own method: LibContinual-interface classes (tests/fixtures) run unchanged as arms."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from harness.config.experiment import parse_experiment
from harness.engine.runner import build_split
from harness.engine.trainer import ArmTrainer
from harness.run import main
from tests.conftest import digits_arm, digits_experiment, write_yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CORE = FIXTURES / "libcl" / "core" / "model"
SPLIT = {"init_cls_num": 2, "inc_cls_num": 2}


def imported(name: str, target: Path, cls: str, epoch: int = 3, **extra: object) -> dict:
    return digits_arm(name, {"import": f"{target}:{cls}", "kwargs": dict(SPLIT, **extra.pop("kwargs", {})), **extra},
                      epoch=epoch)


def fit(arms: list[dict], arm: str, task_num: int = 3) -> ArmTrainer:
    experiment = parse_experiment(digits_experiment(arms, task_num=task_num), str(FIXTURES / "exp.yaml"))
    trainer = ArmTrainer(experiment.arm(arm), build_split(experiment), None)
    trainer.fit()
    return trainer


def test_a_libcontinual_finetune_gives_the_built_in_finetunes_accuracy_matrix() -> None:
    mine = fit([imported("mine", CORE / "finetune.py", "Finetune")], "mine")
    ours = fit([digits_arm("finetune", {"name": "finetune"}, epoch=3)], "finetune")
    a, b = mine.result().matrices, ours.result().matrices
    assert np.array_equal(a["til"], b["til"])  # task-incremental: every cell
    # class-incremental: every trained task (an untrained task's row differs by design: the class's own
    # inference sees the classes trained so far, the harness's FWT row the classes up to that task)
    lower = np.tril_indices(len(a["cil"]))
    assert np.array_equal(a["cil"][lower], b["cil"][lower])
    assert a["cil"][-1].mean() > 0.2 and not mine.method.resumable


def test_a_libcontinual_gem_that_runs_its_own_backward_trains_and_projects() -> None:
    trainer = fit([imported("gem", CORE / "gem.py", "GEM", steps_itself=True, kwargs={"n_memories": 32})], "gem")
    result = trainer.result()
    assert trainer.method.instance.projections > 0
    assert len(trainer.method.instance.memory) == 3  # one memory per finished task
    assert result.matrices["til"][-1].mean() > 0.8  # 2-way tasks: chance is 0.5


@pytest.mark.parametrize(("target", "needles"), [
    (FIXTURES / "double_step.py:SelfStepping", ["double_step.py", "double step"]),
    (FIXTURES / "double_step.py:OwnBackward", ["double_step.py", "steps_itself: true"]),
    (FIXTURES / "broken.py:WrongReturn", ["broken.py", "(pred, acc, loss)"]),
    (FIXTURES / "broken.py:NoObserve", ["broken.py", "no observe()"]),
    (FIXTURES / "raises_on_import.py:Anything", ["raises_on_import.py", "does not import", "ModuleNotFoundError"]),
    (FIXTURES / "broken.py:Missing", ["broken.py", "no class 'Missing'", "NoObserve"]),
    (FIXTURES / "nowhere.py:Cls", ["nowhere.py", "no such file"]),
])
def test_a_class_that_breaks_the_contract_exits_2_naming_file_and_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, needles: list[str]) -> None:
    arm = digits_arm("mine", {"import": str(target)}, epoch=1)
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([arm], task_num=2))
    assert main([str(path), "--tracking-uri", "none", "tracking.local_dir=" + str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_a_libcontinual_method_file_runs_beside_ours_and_the_reference_with_its_source_recorded(
        tmp_path: Path, mlflow_uri: str) -> None:
    """The researcher's method file (classifier: {import: ...}) is one line in the experiment; its source is
    logged with a SHA-256, and the next run's source.diff says what changed."""
    package = tmp_path / "mine"
    (package / "core" / "model").mkdir(parents=True)
    for part in ("core/__init__.py", "core/model/__init__.py", "core/model/finetune.py", "core/model/gem.py"):
        (package / part).write_text((FIXTURES / "libcl" / part).read_text())
    write_yaml(package / "gem.yaml", {"includes": ["headers/optimizer.yaml"], "epoch": 2, "batch_size": 32,
                                      "backbone": {"name": "mlp", "kwargs": {"hidden": [64, 64]}}, "augment": False,
                                      "classifier": {"name": "GEM", "import": "core/model/gem.py:GEM", "steps_itself": True,
                                                     "kwargs": {"num_class": 6, "feat_dim": 64, "n_task": 3,
                                                                "n_memories": 16, **SPLIT}}})
    arms = [{"name": "mine", "config": str(package / "gem.yaml")},
            digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 16}}, epoch=2),
            digits_arm("pycil_gem", {"name": "pycil_gem", "kwargs": {"memory_size": 48}}, epoch=2)]
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment(arms, task_num=3))
    assert main([str(path), "--tracking-uri", mlflow_uri, "--quiet"]) == 0
    gem_file = package / "core" / "model" / "gem.py"
    gem_file.write_text(gem_file.read_text().replace("1e-3 * np.eye(t)", "1e-2 * np.eye(t)"))
    assert main([str(path), "--tracking-uri", mlflow_uri, "--quiet", "--arms", "mine"]) == 0

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["digits-test"], order_by=["attributes.start_time ASC"])
    arm_runs = runs[runs["tags.kind"] != "experiment"]
    assert list(arm_runs["tags.arm"]) == ["mine", "gem", "pycil_gem", "mine"]
    assert arm_runs["tags.split_hash"].nunique() == 1  # identical splits
    first, second = arm_runs[arm_runs["tags.arm"] == "mine"]["run_id"]
    client = MlflowClient(mlflow_uri)
    assert {a.path for a in client.list_artifacts(first, "source")} >= {"source/gem.py", "source/finetune.py",
                                                                         "source/SHA256SUMS"}
    tags = [client.get_run(r).data.tags for r in (first, second)]
    assert tags[0]["source_changed"] == "first run" and tags[1]["source_changed"] == "true"
    assert tags[0]["source_sha256"] != tags[1]["source_sha256"]
    diff = Path(client.download_artifacts(second, "source.diff", str(tmp_path))).read_text()
    assert "-                v = quadprog.solve_qp(G64 @ G64.T + 1e-3" in diff and "+" in diff
