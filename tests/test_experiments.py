"""Every experiment file the project ships validates, with each of its variants."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config.experiment import load_experiment
from harness.config.loader import read_yaml
from tests.conftest import ROOT, SHARED_DATA

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_file_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    monkeypatch.chdir(ROOT)  # data_root paths are relative to the project root
    for variant in [None, *(read_yaml(path).get("variants") or {})]:
        experiment = load_experiment(path, [], variant)
        assert experiment.arms and experiment.split.task_num >= 1
