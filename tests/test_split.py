"""Splits: class-incremental label ranges, validation hold-out, and the domain-incremental protocols."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.config.experiment import parse_experiment
from harness.data.split import Split
from harness.engine.runner import build_split
from harness.run import main
from tests.conftest import digits_arm, digits_experiment, write_yaml


def split_for(**split: object) -> Split:
    raw = digits_experiment([digits_arm("a", {"name": "finetune"})], **split)
    if "protocol" in split:  # every task has all ten classes
        del raw["split"]["init_cls_num"], raw["split"]["inc_cls_num"]
    return build_split(parse_experiment(raw, "t.yaml"))


def test_class_incremental_tasks_own_their_label_ranges() -> None:
    split = split_for(class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert split.bounds == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert split.task_classes(0) == [9, 8] and split.seen_classes(2) == 6
    for t, task in enumerate(split.tasks):
        lo, hi = split.bounds[t]
        assert ((split.train_y[task.train] >= lo) & (split.train_y[task.train] < hi)).all()
        # the remapped label of an original class-9 image is 0
        assert set(split.dataset.train_y[task.train].tolist()) == set(split.task_classes(t))
    lo, hi = split.label_bounds(torch.tensor([0, 3, 9]))
    assert lo.tolist() == [0, 2, 8] and hi.tolist() == [2, 4, 10]


def test_validation_holdout_is_disjoint_and_per_class() -> None:
    split = split_for(val_fraction=0.25)
    for task in split.tasks:
        assert not set(task.train.tolist()) & set(task.val.tolist())
        for c in split.train_y[task.val].unique():
            n_val = int((split.train_y[task.val] == c).sum())
            n_all = n_val + int((split.train_y[task.train] == c).sum())
            assert n_val == round(n_all * 0.25)
    assert split.digest != split_for().digest


def test_permutations_protocol_permutes_pixels_per_task() -> None:
    split = split_for(protocol="permutations", task_num=3, samples_per_task=100)
    ds = split.dataset
    assert split.bounds == [(0, 10)] * 3 and split.seen_classes(0) == 10
    assert [len(t.train) for t in split.tasks] == [100, 100, 100]
    n_test = len(split.tasks[0].test)
    assert len(ds.test_x) == 3 * n_test
    first, second = ds.test_x[:n_test].flatten(1), ds.test_x[n_test : 2 * n_test].flatten(1)
    assert not torch.equal(first, second)  # different permutations
    assert torch.equal(first.sort(1).values, second.sort(1).values)  # same pixels, rearranged
    assert torch.equal(split.test_y[:n_test], split.test_y[n_test : 2 * n_test])


def test_rotations_protocol_starts_unrotated() -> None:
    split = split_for(protocol="rotations", task_num=4, samples_per_task=50)
    plain = split_for(class_order="label")
    n_test = len(split.tasks[0].test)
    assert n_test == sum(len(t.test) for t in plain.tasks)
    assert torch.equal(split.dataset.test_x[:n_test], plain.dataset.test_x)  # task 0: 0 degrees
    assert not torch.equal(split.dataset.test_x[n_test : 2 * n_test], plain.dataset.test_x)


@pytest.mark.parametrize("change, key, message", [
    ({"samples_per_task": 100}, "split.samples_per_task", "only applies"),
    ({"protocol": "permutation"}, "split.protocol", "did you mean 'permutations'"),
    ({"protocol": "rotations", "inc_cls_num": 2}, "split.inc_cls_num", "inc_cls_num 0"),
])
def test_protocol_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, key: str, message: str) -> None:
    raw = digits_experiment([digits_arm("a", {"name": "finetune"})], **change)
    if change.get("protocol") == "rotations":
        raw["split"].pop("init_cls_num")
    assert main([str(write_yaml(tmp_path / "e.yaml", raw)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert key in err and message in err, err


def test_pycil_arm_needs_a_class_incremental_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = digits_experiment([digits_arm("p", {"name": "pycil_gem"})], protocol="permutations", task_num=2)
    for key in ("init_cls_num", "inc_cls_num"):
        raw["split"].pop(key)
    assert main([str(write_yaml(tmp_path / "e.yaml", raw)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "method.name" in err and "pycil_gem supports the class_incremental protocol(s), not permutations" in err
