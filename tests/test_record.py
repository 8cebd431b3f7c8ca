"""Seeds as an axis, and the reproduction record: committed MLflow runs that a fresh clone can read, a report
that only adds to docs/REPRODUCTION.md, and validation metrics that cannot pass for test metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient

from harness.report import COMPARISONS, TARGETS, Row, comparison_line, paired_interval, recipe_key, welch_interval
from harness.run import main
from harness.tracking import MlflowTracker, RunInfo
from tests.conftest import ROOT, digits_arm, digits_experiment, expect_exit_2, mlflow_server, rest, write_yaml


def _exit_2(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    expect_exit_2(main, args, capsys, *needles)


def test_every_arm_runs_once_per_seed_and_the_summary_has_mean_and_std(
        tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    arms = [digits_arm("finetune", {"name": "finetune"}, epoch=1), digits_arm("gem", {"name": "gem", "kwargs":
                                                                                  {"n_memories": 16}}, epoch=1)]
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment(arms, task_num=2))
    assert main([str(path), "--tracking-uri", mlflow_uri, "--seeds", "3,7", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "± " in out and "(2)" in out  # the table: mean ± std (n)
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["digits-test"])
    parent = runs[runs["tags.kind"] == "experiment"].iloc[0]
    arm_runs = runs[runs["tags.kind"] != "experiment"]
    assert sorted(zip(arm_runs["tags.arm"], arm_runs["tags.seed"], strict=True)) == [
        ("finetune", "3"), ("finetune", "7"), ("gem", "3"), ("gem", "7")]
    assert set(arm_runs["params.engine.seed"]) == {"3", "7"}
    assert arm_runs["tags.split_hash"].nunique() == 1  # the split does not move with the engine seed
    gem = arm_runs[arm_runs["tags.arm"] == "gem"]["metrics.task0_acc"]
    assert parent["metrics.gem.task0_acc.mean"] == pytest.approx(gem.mean())
    assert parent["metrics.gem.task0_acc.std"] == pytest.approx(gem.std(ddof=1))
    assert parent["metrics.gem.task0_acc.n"] == 2
    assert set(arm_runs["tags.mlflow.runName"]) == {"finetune seed=3", "finetune seed=7", "gem seed=3", "gem seed=7"}


@pytest.mark.parametrize(("args", "needle"), [
    (["seeds=[]"], "seeds"), (["seeds=[a]"], "seeds[0]"), (["seeds=[1, 1]"], "more than once"),
    (["--seeds", "1,x"], "--seeds"), (["--seeds", "2,2"], "more than once")])
def test_bad_seeds_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                        needle: str) -> None:
    path = write_yaml(tmp_path / "exp.yaml", digits_experiment([digits_arm("a", {"name": "finetune"}, epoch=1)]))
    _exit_2([str(path), "--tracking-uri", "none", *args], capsys, needle)


def _stopped_in_second_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                             arm: str, experiment: str) -> tuple[str, Run, Run]:
    """An experiment whose only arm stops in its second epoch (the loss diverges): the first epoch was
    checkpointed. Returns the store's URI, the parent run and the arm's run."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    diverging = digits_arm(arm, {"name": "finetune"}, epoch=2,
                           lr_scheduler={"name": "StepLR", "kwargs": {"step_size": 1, "gamma": 1e15}})
    path = write_yaml(tmp_path / "exp.yaml", {**digits_experiment([diverging], task_num=3), "name": experiment})
    _exit_2([str(path), "--tracking-uri", uri, "--quiet"], capsys, "non-finite")
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.kind = 'experiment'")[0]
    child = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")[0]
    return uri, parent, child


def test_a_resume_whose_checkpoint_is_gone_stops_and_names_run_and_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    uri, parent, child = _stopped_in_second_epoch(tmp_path, capsys, monkeypatch, "a", "digits-test")
    folder = Path(child.data.tags["checkpoint_dir"])
    assert folder == tmp_path / "cache" / "runs" / child.info.run_id / "checkpoints"  # the one documented place
    assert (folder / "last.pt").is_file()
    shutil.rmtree(folder)  # this machine's copy, and the record's
    MlflowTracker(uri, None).delete_artifacts(child.info.run_id, "checkpoints")
    _exit_2(["--resume", parent.info.run_id, "--tracking-uri", uri], capsys, child.info.run_id, str(folder / "last.pt"),
            "checkpoints/last.pt", "--force")


def test_the_report_lists_unfinished_runs_with_their_progress_and_resume_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    uri, parent, child = _stopped_in_second_epoch(tmp_path, capsys, monkeypatch, "gem", "gem_vs_pycil")  # a target
    (tmp_path / "docs").mkdir()
    result = _report(tmp_path, "--tracking-uri", uri)
    assert result.returncode == 0, result.stderr
    record = (tmp_path / "docs" / "REPRODUCTION.md").read_text()
    section = record.split("## In progress")[1].split("\n## ")[0]
    # one epoch of 2 + 2 + 2 trained; the row names how it computes and the command that continues it
    assert (f"| gem_vs_pycil | gem | 0 | `{child.info.run_id[:8]}` | 1 of 6 epochs | cpu; "
            f"{child.data.tags['precision']}; {child.data.tags['cpu_capability']} | "
            f"`python -m harness.run --resume {parent.info.run_id}` |") in section
    assert "| gem_vs_pycil | gem | task-0 within 1 point of pycil_gem (same recipe) | not run |" in record
    # read from a store that does not hold the run (another machine's), the line stays as it was
    assert _report(tmp_path, "--tracking-uri", str(tmp_path / "empty")).returncode == 0
    assert (tmp_path / "docs" / "REPRODUCTION.md").read_text() == record


def test_welch_interval_needs_two_seeds_a_side() -> None:
    assert welch_interval([0.70, 0.72], [0.80]) is None
    low, high = welch_interval([0.70, 0.72, 0.71], [0.80, 0.82, 0.79])
    assert low < -0.08 < high < 0


def test_arms_that_share_seeds_are_compared_seed_by_seed_with_a_paired_interval() -> None:
    def row(arm: str, acc: dict[str, float]) -> Row:
        target = next(t for t in TARGETS if (t.experiment, t.arm) == ("gem_vs_pycil", arm))
        runs = [RunInfo(f"{arm}{seed}".ljust(32, "0"), f"{arm} seed={seed}", "FINISHED", "e",
                        {"device": "cpu", "precision": "fp32", "seed": seed}, {"engine.seed": seed},
                        {"task0_acc": value}) for seed, value in acc.items()]
        return Row(target, runs[0], runs)

    comparison = COMPARISONS[0]
    assert (comparison.experiment, comparison.a[0], comparison.b[0]) == ("gem_vs_pycil", "gem", "pycil_gem")
    reference = row("pycil_gem", {"1993": 0.814, "1994": 0.784})
    # the same network trained the same way: every seed's difference is 0, so the paired interval is [0, 0]
    # while Welch's, blind to the pairing, spans the seeds' 3-point spread (t(0.975, df 2) 4.303 x se 0.0212)
    cells = comparison_line(comparison, row("gem", {"1994": 0.784, "1993": 0.814}), reference).split(" | ")
    assert cells[3:6] == ["+0.000", "[-0.091, +0.091]", "1994: +0.000, 1993: +0.000; [+0.000, +0.000]"]
    cells = comparison_line(comparison, row("gem", {"1993": 0.804}), reference).split(" | ")
    assert cells[4:6] == ["n/a (n = 1 and 2; needs ≥ 2 each)", "1993: -0.010; n/a (one shared seed; needs ≥ 2)"]
    assert comparison_line(comparison, row("gem", {"7": 0.8}), reference).split(" | ")[5] == "no shared seed"
    # a difference that moves with the seed: the interval of its mean covers both pairs' differences
    low, high = paired_interval([0.7865, 0.764], [0.734, 0.7585])
    assert low < 0.0055 < 0.0525 < high and (low + high) / 2 == pytest.approx(0.029)


def test_a_key_added_later_with_a_null_default_keeps_older_runs_in_their_row() -> None:
    def run(**params: str) -> RunInfo:
        return RunInfo("r", "gem seed=0", "FINISHED", "e", {"device": "cpu", "precision": "fp32"},
                       {"epoch": "80", "engine.seed": "0", **params}, {})

    older, newer = run(), run(**{"split.max_per_class": "None", "engine.seed": "1"})
    assert recipe_key(older) == recipe_key(newer)
    assert recipe_key(run(**{"split.max_per_class": "5"})) != recipe_key(older)  # a set value is a recipe
    assert recipe_key(run(epoch="200")) != recipe_key(older)


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of this repository's committed state: the record as a new user gets it."""
    target = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(target)], check=True, capture_output=True)
    return target


def _report(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.report", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(cwd)}, timeout=600)


def test_a_fresh_clone_loads_the_record_and_regenerates_the_report_unchanged(clone: Path) -> None:
    runs = sorted(p.parent.name for p in (clone / "mlruns").glob("*/*/meta.yaml"))
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(str(clone / "mlruns"))
    found = [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sorted(found) == runs
    before = (clone / "docs" / "REPRODUCTION.md").read_text()
    result = _report(clone)
    assert result.returncode == 0, result.stderr
    assert (clone / "docs" / "REPRODUCTION.md").read_text() == before
    assert _git("status", "--porcelain", cwd=clone) == ""  # plots too: nothing in the clone changed


def test_the_report_on_an_empty_store_keeps_every_row(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    record = (ROOT / "docs" / "REPRODUCTION.md").read_text()
    (tmp_path / "docs" / "REPRODUCTION.md").write_text(record)
    result = _report(tmp_path, "--tracking-uri", str(tmp_path / "empty"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "docs" / "REPRODUCTION.md").read_text() == record
    assert "kept" in result.stdout


def test_a_corrupt_record_stops_the_report_naming_the_file(tmp_path: Path, clone: Path) -> None:
    store = tmp_path / "mlruns"
    shutil.copytree(clone / "mlruns", store)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "REPRODUCTION.md").write_text("# Reproduction record\n")
    metas = sorted(store.glob("*/*/meta.yaml"))
    if not metas:
        pytest.skip("the committed record holds no run yet")
    metas[0].write_text("run_id: [unclosed\n")
    result = _report(tmp_path, "--tracking-uri", str(store))
    assert result.returncode == 2 and str(metas[0]) in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "docs" / "REPRODUCTION.md").read_text() == "# Reproduction record\n"  # nothing overwritten


def test_mlflow_server_on_a_clone_serves_every_recorded_run_and_its_artifacts(clone: Path) -> None:
    with mlflow_server(["--backend-store-uri", "mlruns", "--workers", "1"], clone,
                       {"MLFLOW_ALLOW_FILE_STORE": "true"}) as base:
        experiments = rest(base, "/api/2.0/mlflow/experiments/search", {"max_results": 1000}).get("experiments", [])
        ids = [e["experiment_id"] for e in experiments]
        runs = rest(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": ids, "max_results": 1000}).get("runs", [])
        assert sorted(r["info"]["run_id"] for r in runs) == sorted(p.parent.name for p in
                                                                   (clone / "mlruns").glob("*/*/meta.yaml"))
        arm = next((r for r in runs if r["info"]["status"] == "FINISHED"
                    and any(t["key"] == "arm" for t in r["data"].get("tags", []))), None)
        if arm is not None:  # a finished arm's matrix is served from the clone's relative artifact path
            url = f"{base}/get-artifact?path=accuracy_matrix.json&run_uuid={arm['info']['run_id']}"
            matrix = json.loads(urllib.request.urlopen(url, timeout=30).read())
            assert "cil" in matrix


def test_the_committed_record_keeps_to_its_budget() -> None:
    """At most 30 MB in all and 1 MB per run: params, metric histories, tags and small artifacts only; besides
    them, only a run that has not finished carries a checkpoint (``artifacts/checkpoints/last.pt``, what a
    later session resumes it from), at most 64 MB each."""
    store = ROOT / "mlruns"

    def is_checkpoint(path: Path) -> bool:
        return path.parent.name == "checkpoints" and path.parent.parent.name == "artifacts"

    files = [p for p in store.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files if not is_checkpoint(p)) <= 30 * 2**20
    for run in store.glob("*/*/meta.yaml"):
        size = sum(p.stat().st_size for p in run.parent.rglob("*") if p.is_file() and not is_checkpoint(p))
        assert size <= 2**20, f"{run.parent} holds {size} bytes"
        checkpoints = [p for p in run.parent.rglob("*") if p.is_file() and is_checkpoint(p)]
        if yaml.safe_load(run.read_text())["status"] == RunStatus.FINISHED:  # the file store keeps the number
            assert not checkpoints, f"{run.parent}: a finished run keeps no checkpoint"
        assert all(p.name == "last.pt" and p.stat().st_size <= 64 * 2**20 for p in checkpoints)
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".ckpt") and not is_checkpoint(p)]
