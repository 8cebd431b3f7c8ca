"""Metric formulas on a hand-computed accuracy matrix."""

import math

import numpy as np
import pytest

from harness.metrics import (
    accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    old_new_accuracy,
    seen_accuracy,
    summarize,
)

# R[i, j]: accuracy on task j after training task i.
R = np.array([[0.9, 0.1, 0.2],
              [0.6, 0.8, 0.3],
              [0.5, 0.7, 0.9]])
B = np.array([0.1, 0.1, 0.1])
SIZES = np.array([100.0, 100.0, 200.0])


def test_acc_is_mean_of_last_row() -> None:
    assert accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)


def test_bwt_paper_and_code_normalisation() -> None:
    terms = (0.5 - 0.9) + (0.7 - 0.8)
    assert backward_transfer(R) == pytest.approx(terms / 2)
    assert backward_transfer(R, paper=False) == pytest.approx(terms / 3)


def test_fwt_paper_and_code_normalisation() -> None:
    terms = (0.1 - 0.1) + (0.3 - 0.1)
    assert forward_transfer(R, B) == pytest.approx(terms / 2)
    assert forward_transfer(R, B, paper=False) == pytest.approx(terms / 3)


def test_forgetting_uses_best_earlier_accuracy() -> None:
    assert forgetting(R) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


def test_seen_and_average_incremental_accuracy_weight_by_test_size() -> None:
    seen = seen_accuracy(R, SIZES)
    assert seen == pytest.approx([0.9, 0.7, (50 + 70 + 180) / 400])
    assert average_incremental_accuracy(R, SIZES) == pytest.approx(np.mean(seen))


def test_old_and_new_accuracy() -> None:
    old, new = old_new_accuracy(R, SIZES)
    assert math.isnan(old[0])
    assert old[1:] == pytest.approx([0.6, 0.6])
    assert new == pytest.approx([0.9, 0.8, 0.9])


def test_single_task_has_no_transfer() -> None:
    one = np.array([[0.8]])
    assert math.isnan(backward_transfer(one)) and math.isnan(forward_transfer(one, B[:1])) and math.isnan(forgetting(one))
    assert summarize(one, B[:1], SIZES[:1], "cil")["cil_acc"] == pytest.approx(0.8)
