"""Experiment files: includes and deep merge, overrides, LibContinual keys, and every validation error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config.experiment import load_experiment
from harness.config.loader import apply_overrides, deep_merge, load_with_includes
from harness.data.split import class_order
from harness.run import main
from tests.conftest import CIFAR100, digits_arm, digits_experiment, needs_cifar, write_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"optimizer": {"name": "SGD", "kwargs": {"lr": 0.1, "momentum": 0.9}}, "milestones": [1, 2]}
    top = {"optimizer": {"kwargs": {"lr": 0.01}}, "milestones": [5]}
    assert deep_merge(base, top) == {"optimizer": {"name": "SGD", "kwargs": {"lr": 0.01, "momentum": 0.9}},
                                     "milestones": [5]}


def test_includes_load_in_order_relative_then_project_and_the_including_file_wins(tmp_path: Path) -> None:
    write_yaml(tmp_path / "local.yaml", {"epoch": 7, "optimizer": {"kwargs": {"lr": 0.5}}})
    write_yaml(tmp_path / "arm.yaml", {"includes": ["headers/optimizer.yaml", "local.yaml"],
                                       "optimizer": {"kwargs": {"momentum": 0.5}}})
    merged = load_with_includes(tmp_path / "arm.yaml")
    assert merged["epoch"] == 7
    # headers/optimizer.yaml (project configs/) gives name and weight decay; local.yaml the lr; the file momentum
    assert merged["optimizer"] == {"name": "SGD", "kwargs": {"lr": 0.5, "momentum": 0.5, "weight_decay": 5e-4}}
    assert merged["lr_scheduler"]["kwargs"]["milestones"] == [60, 120, 170]


def test_overrides_address_arms_by_name_and_parse_yaml() -> None:
    raw = digits_experiment([digits_arm("a", {"name": "finetune"}), digits_arm("gem", {"name": "gem"})])
    out = apply_overrides(raw, ["arms.gem.epoch=2", "split.task_num=3", "arms.*.batch_size=16",
                                "arms.gem.method.kwargs.memory_strength=0", "split.class_order=[1, 0, 2, 3, 4, 5]"])
    assert out["arms"][1]["epoch"] == 2 and out["arms"][0]["epoch"] == 4
    assert out["split"]["task_num"] == 3 and out["split"]["class_order"][:2] == [1, 0]
    assert {a["batch_size"] for a in out["arms"]} == {16}
    assert out["arms"][1]["method"]["kwargs"]["memory_strength"] == 0
    assert raw["arms"][1]["epoch"] == 4  # the input is not modified


def test_pycil_class_order_seed_1993() -> None:
    assert class_order("seed:1993", 100)[:20] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80,
                                                  43, 38]
    assert class_order("label", 5) == [0, 1, 2, 3, 4]


@needs_cifar
def test_libcontinual_method_file_maps_to_a_gem_arm(tmp_path: Path) -> None:
    experiment = write_yaml(tmp_path / "exp.yaml", {
        "split": {"dataset": "cifar100", "data_root": str(CIFAR100), "class_order": "seed:1993", "init_cls_num": 20,
                  "inc_cls_num": 20, "task_num": 5, "seed": 1993},
        "arms": [{"name": "seed", "config": str(ROOT / "configs" / "gem_seed_recipe.yaml")}]})
    arm = load_experiment(experiment).arm("seed")
    assert arm.method.name == "gem"
    assert arm.method.kwargs["n_memories"] == 5120 and arm.method.kwargs["memory_strength"] == 0.0
    assert arm.optimizer.kwargs == {"lr": 0.1, "momentum": 0.95, "weight_decay": 2e-4}
    assert arm.lr_scheduler.name == "StepLR" and arm.lr_scheduler.kwargs["step_size"] == 30
    assert (arm.epoch, arm.batch_size, arm.warmup, arm.backbone.name) == (80, 128, 3, "resnet32")
    assert arm.recorded["val_per_epoch"] == 10  # recorded, no effect


# Each bad input: (what is changed, the key the one-line message must name).
BAD_INPUTS = [
    ("arms.0.optimzer", {"name": "SGD"}, "optimzer", "did you mean 'optimizer'"),
    ("arms.0.epoch", "ten", "epoch", "must be int"),
    ("arms.0.epoch", 0, "epoch", ">= 1"),
    ("arms.0.batch_size", -4, "batch_size", ">= 1"),
    ("split.dataset", "cifar1000", "split.dataset", "unknown dataset"),
    ("arms.0.backbone.name", "resnt32", "backbone.name", "did you mean 'resnet32'"),
    ("arms.0.method.name", "gen", "method.name", "did you mean 'gem'"),
    ("arms.0.optimizer.name", "SDG", "optimizer.name", "unknown optimizer"),
    ("arms.0.lr_scheduler", {"name": "MultiStep"}, "lr_scheduler.name", "did you mean 'MultiStepLR'"),
    ("arms.0.optimizer.kwargs.lr", -1.0, "optimizer.kwargs", "Invalid learning rate"),
    ("arms.0.optimizer.kwargs.momentun", 0.9, "optimizer.kwargs.momentun", "did you mean 'momentum'"),
    ("split.task_num", 6, "split.task_num", "12 classes"),
    ("split.class_order", [0, 0, 1, 2, 3, 4, 5, 6, 7, 8], "split.class_order", "distinct"),
    ("split.class_order", "random", "split.class_order", "'label', 'seed:N'"),
    ("arms.0.method.kwargs.memory_strenght", 0.5, "method.kwargs.memory_strenght", "did you mean 'memory_strength'"),
    ("arms.0.method.kwargs.train_mask", "all", "method.kwargs.train_mask", "'task', 'seen', 'none'"),
    ("arms.0.method.kwargs.n_memories", 0, "method.kwargs.n_memories", ">= 1"),
    ("arms.0.augment", {"brightness": 2.0}, "augment.brightness", "<= 1.0"),
    ("engine.device", 3, "engine.device", "must be str"),
    ("split.val_fraction", 1.5, "split.val_fraction", "[0, 1)"),
    ("arms.0.buffer", {"name": "LinearBuffer", "kwargs": {"buffer_size": 500}}, "buffer.kwargs.buffer_size",
     "not a rehearsal buffer"),
    ("arms.0.classifier", {"name": "GEM", "kwargs": {"num_class": 100}}, "classifier", "either method or classifier"),
    ("arms.0.init_cls_num", 4, "init_cls_num", "must share the split"),
]


def _set(raw: dict, dotted: str, value: object) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value


@pytest.mark.parametrize("where, value, key, message", BAD_INPUTS, ids=[f"{b[0]}={b[1]}" for b in BAD_INPUTS])
def test_bad_value_exits_2_with_one_line_naming_key_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             where: str, value: object, key: str, message: str) -> None:
    raw = digits_experiment([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 8}})])
    _set(raw, where, value)
    path = write_yaml(tmp_path / "bad.yaml", raw)
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and key in err and message in err, err


def _expect_error(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_no_arms_and_duplicate_arms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    none = write_yaml(tmp_path / "none.yaml", digits_experiment([]))
    _expect_error([str(none), "--dry-run"], capsys, "arms", "at least one arm")
    twice = write_yaml(tmp_path / "twice.yaml", digits_experiment([digits_arm("a", {"name": "finetune"})] * 2))
    _expect_error([str(twice), "--dry-run"], capsys, "arms[1].name", "duplicate arm name 'a'")


def test_bad_yaml_missing_file_and_bad_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("split: {dataset: digits\narms: [")
    _expect_error([str(broken)], capsys, str(broken), "invalid YAML", "line")
    _expect_error([str(tmp_path / "nope.yaml")], capsys, "nope.yaml", "file not found")
    good = write_yaml(tmp_path / "good.yaml", digits_experiment([digits_arm("a", {"name": "finetune"})]))
    _expect_error([str(good), "arms.b.epoch=1", "--dry-run"], capsys, "no arm named 'b'")
    _expect_error([str(good), "epoch", "--dry-run"], capsys, "key.path=value")


def test_missing_data_root_and_wrong_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = digits_experiment([digits_arm("a", {"name": "finetune"})], dataset="cifar100", init_cls_num=20,
                            inc_cls_num=20, data_root=str(tmp_path / "missing"))
    path = write_yaml(tmp_path / "exp.yaml", raw)
    _expect_error([str(path), "--dry-run"], capsys, "split.data_root", "does not exist")
    del raw["split"]["data_root"]
    write_yaml(path, raw)
    _expect_error([str(path), "--dry-run"], capsys, "split.data_root", "is required")
    (tmp_path / "empty").mkdir()
    raw["split"]["data_root"] = str(tmp_path / "empty")
    write_yaml(path, raw)
    _expect_error([str(path), "--dry-run"], capsys, "neither the image-folder layout")


def test_method_file_errors_name_the_method_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arm_file = write_yaml(tmp_path / "gem.yaml", {"includes": ["backbones/mlp.yaml"], "epoch": 1,
                                                  "classifier": {"name": "GEM", "kwargs": {"num_class": 100}}})
    raw = digits_experiment([{"name": "lc", "config": "gem.yaml"}])
    path = write_yaml(tmp_path / "exp.yaml", raw)
    _expect_error([str(path), "--dry-run"], capsys, str(arm_file), "classifier.kwargs.num_class", "10 classes")
    write_yaml(arm_file, {"includes": ["backbones/mlp.yaml"], "epoch": 1,
                          "classifier": {"name": "GEM", "kwargs": {"feat_dim": 64, "n_task": 5}}})
    _expect_error([str(path), "--dry-run"], capsys, "classifier.kwargs.feat_dim", "100-d features")
    write_yaml(arm_file, {"includes": ["headers/missing.yaml"]})
    _expect_error([str(path), "--dry-run"], capsys, "headers/missing.yaml", "not found")
    raw["arms"][0]["config"] = "absent.yaml"
    write_yaml(path, raw)
    _expect_error([str(path), "--dry-run"], capsys, "arms[0].config", "absent.yaml")


def test_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm("a", {"name": "finetune"}),
                                                                digits_arm("j", {"name": "joint"})]))
    assert main([str(path), "--dry-run", "arms.a.epoch=3"]) == 0
    out = capsys.readouterr().out
    assert "task 0: classes [0, 1]" in out and "task 4: classes [8, 9]" in out
    assert "arm a (finetune, mlp)" in out and "epochs per task [3, 3, 3, 3, 3]" in out
    resolved = yaml.safe_load(out.split("\nsplit ")[0])
    assert resolved["arms"][0]["epoch"] == 3 and len(resolved["split"]["hash"]) == 16


def test_a_renamed_block_replaces_the_included_one() -> None:
    base = {"lr_scheduler": {"name": "MultiStepLR", "kwargs": {"milestones": [60], "gamma": 0.1}}}
    top = {"lr_scheduler": {"name": "StepLR", "kwargs": {"step_size": 30}}}
    assert deep_merge(base, top)["lr_scheduler"] == {"name": "StepLR", "kwargs": {"step_size": 30}}


def test_arms_sharing_a_yaml_anchor_are_overridden_one_at_a_time(tmp_path: Path) -> None:
    text = """
name: anchors
split: {dataset: digits, class_order: label, init_cls_num: 2, inc_cls_num: 2, task_num: 5}
arms:
  - &recipe
    name: a
    method: {name: finetune}
    backbone: {name: mlp}
    epoch: 1
    batch_size: 32
    optimizer: {name: SGD, kwargs: {lr: 0.1, momentum: 0.9}}
  - <<: *recipe
    name: b
"""
    path = tmp_path / "anchors.yaml"
    path.write_text(text)
    experiment = load_experiment(path, ["arms.b.optimizer.kwargs.lr=0.5"])
    assert experiment.arm("a").optimizer.kwargs == {"lr": 0.1, "momentum": 0.9}
    assert experiment.arm("b").optimizer.kwargs == {"lr": 0.5, "momentum": 0.9}


def test_an_override_error_names_the_override_not_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm("gem", {"name": "gem"})]))
    assert main([str(path), "split.task_num=2", "arms.gem.epochs=2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: override arms.gem.epochs=2: unknown key 'epochs' (did you mean 'epoch'?)"), err
    assert len(err.splitlines()) == 1
    assert main([str(path), "engine.amp=maybe", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: override engine.amp=maybe: must be bool or one of 'auto', not 'maybe'"


def test_help_is_plain_text_and_parsed_before_torch_loads() -> None:
    code = ("import sys, contextlib, io\nfrom harness.run import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
            "print('torch' in sys.modules, '``' in out.getvalue(), 'examples:' in out.getvalue())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == ["False", "False", "True"]
