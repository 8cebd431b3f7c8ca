"""Where runs are recorded: MLflow (any tracking URI) or, with ``tracking.uri: none``, a local folder with
the same params, metrics, tags and artifacts for machines without MLflow.

Runs are addressed by id through a client, never through MLflow's global "active run", so a resumed
experiment can log into the same runs again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import TrackingUnavailable, UserError
from harness.paths import run_work_dir

PARAM_LIMIT = 6000  # MLflow's maximum parameter value length
KIND_TAG = "mlflow.experimentKind"  # what mlflow ui reads to choose its model-training layout
VIEW = "harness"  # the shared runs-table view: mlflow ui's ?viewStateShareKey=harness
HEADLINE = ("task0_acc", "cil_acc", "til_acc", "cil_avg_incremental", "cil_bwt", "wall_seconds")
# The runs table as mlflow ui restores it from the shared view: the headline metric columns, and the runs
# grouped by their ``arm`` tag, so each arm is one row with its seeds' average, visible without a click
# (a shared view cannot expand a parent run's nested children; grouping lifts them to the top level).
SHARED_VIEW = {"selectedColumns": [f"metrics.`{m}`" for m in HEADLINE],
               "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "arm"}]}}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (lists stay whole, as YAML-ish text)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:PARAM_LIMIT]
    return flat


def _names(values: dict[str, Any], shown: int = 6) -> str:
    """The first ``shown`` keys, and how many more."""
    keys = list(values)
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


# Metrics whose step counts epochs (the trainer's and a trial's per-epoch values) carry this in their name.
EPOCH_METRIC = "epoch_"


class Run:
    """One run of a tracker: an arm, a trial or an experiment's parent. ``held``: for a run continued from
    its checkpoint, the last step of each per-epoch metric the record already holds (``Run.continued``)."""

    def __init__(self, tracker: Tracker, run_id: str, held: dict[str, int] | None = None) -> None:
        self.tracker, self.run_id, self.held = tracker, run_id, held or {}

    @classmethod
    def continued(cls, tracker: Tracker, run_id: str) -> Run:
        """The run, holding back per-epoch values at steps the record has: a process killed between an
        epoch's metrics and the checkpoint that follows them trains that epoch again from the checkpoint,
        to the same values (resume is exact), and the history keeps one point per epoch."""
        keys = [k for k in tracker.info(run_id).metrics if k.startswith(EPOCH_METRIC)]
        return cls(tracker, run_id, {k: max(tracker.metric_steps(run_id, k)) for k in keys})

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.log_params(self.run_id, flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        values = {k: v for k, v in finite(metrics).items() if step > self.held.get(k, -1)}
        if values:
            self.tracker.log_metrics(self.run_id, values, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.tracker.log_artifact(self.run_id, path, folder)

    def end(self, status: str = "FINISHED") -> None:
        self.tracker.end(self.run_id, status)

    def local_dir(self) -> Path:
        """The run's working folder on this machine (checkpoints, the log being written): ``run_work_dir``."""
        return run_work_dir(self.run_id)


class Tracker:
    """Interface shared by the MLflow and local-folder backends."""

    description = ""
    uri = "none"  # what --tracking-uri names this store by

    def use_experiment(self, name: str) -> None:
        raise NotImplementedError

    def describe(self, description: str) -> None:
        """Say what the current experiment is (shown where its runs are browsed)."""

    def start(self, name: str, tags: dict[str, str], parent: Run | None = None) -> Run:
        raise NotImplementedError

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        raise NotImplementedError

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        raise NotImplementedError

    def log_artifact(self, run_id: str, path: Path, folder: str | None) -> None:
        raise NotImplementedError

    def end(self, run_id: str, status: str) -> None:
        raise NotImplementedError

    def reopen(self, run_id: str) -> Run:
        """Mark an interrupted run RUNNING again so a resumed arm logs into the same run (``Run.continued``)."""
        raise NotImplementedError

    def read_artifact(self, run_id: str, path: str) -> str | None:
        """A text artifact of the run, or None if it has none by that name."""
        raise NotImplementedError

    def download_artifact(self, run_id: str, path: str, dest: Path) -> Path | None:
        """Copy the run's artifact ``path`` into ``dest``; the local file, or None if the run has no such artifact."""
        raise NotImplementedError

    def delete_artifacts(self, run_id: str, path: str) -> None:
        """Remove the run's artifact folder (or file) ``path``, if it has one."""
        raise NotImplementedError

    def exists(self, run_id: str) -> bool:
        try:
            self.info(run_id)
        except UserError:
            return False
        return True

    def previous_arm_run(self, arm: str, before: str) -> RunInfo | None:
        """The latest FINISHED run of the arm named ``arm`` in the current experiment, other than ``before``."""
        raise NotImplementedError

    def info(self, run_id: str) -> RunInfo:
        raise NotImplementedError

    def children(self, parent_id: str) -> list[RunInfo]:
        raise NotImplementedError

    def metric_steps(self, run_id: str, key: str) -> dict[int, float]:
        """The metric's value at each step it was logged at (the last value logged there), by step."""
        raise NotImplementedError

    def metric_history(self, run_id: str, key: str) -> list[float]:
        """The metric's values ordered by step (the last value logged at each step)."""
        by_step = self.metric_steps(run_id, key)
        return [by_step[k] for k in sorted(by_step)]


@dataclass
class RunInfo:
    run_id: str
    name: str
    status: str
    experiment: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


class MlflowTracker(Tracker):
    def __init__(self, uri: str, experiment: str | None) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        # MLflow announces schema creation and migrations at INFO on stderr; errors stay one clear line.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri, self.description = uri, f"MLflow at {uri}"
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = ""
        if experiment is not None:
            self.use_experiment(experiment)

    def use_experiment(self, name: str) -> None:
        import mlflow

        try:
            found = self.client.get_experiment_by_name(name)
            if found:
                self.experiment_id = found.experiment_id
            else:
                self.experiment_id = self.client.create_experiment(name, artifact_location=artifact_root(self.uri),
                                                                   tags={KIND_TAG: "custom_model_development"})
                keep_relocatable(self.uri, self.experiment_id)
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            raise UserError(f"MLflow store {self.uri}: {str(exc).splitlines()[0]}") from None

    def describe(self, description: str) -> None:
        """The experiment's note (``mlflow.note.content``), its kind (a model-training experiment), and a
        shared view of the runs table with the headline metric columns selected (``VIEW``), which the link
        ``harness.run`` prints opens."""
        tags = self.client.get_experiment(self.experiment_id).tags
        wanted = {KIND_TAG: "custom_model_development", "mlflow.note.content": description,
                  f"mlflow.sharedViewState.{VIEW}": json.dumps(SHARED_VIEW)}
        for key, value in wanted.items():
            if value and tags.get(key) != value:
                self.client.set_experiment_tag(self.experiment_id, key, value)

    def start(self, name: str, tags: dict[str, Any], parent: Run | None = None) -> Run:
        # Tag values are strings: a local store coerces them, a tracking server's REST API does not.
        tags = {k: str(v) for k, v in tags.items()}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.run_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        return Run(self, run.info.run_id)

    @contextlib.contextmanager
    def _delivering(self, run_id: str, what: str) -> Iterator[None]:
        """Turn a tracking server that stopped answering (after MLflow's own retries) into one line that
        names the run and what was not delivered."""
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        try:
            yield
        except MlflowException as exc:
            cause = exc.__cause__ or exc.__context__
            if not isinstance(cause, RequestException):
                raise
            reason = "connection refused" if "Connection refused" in str(cause) else type(cause).__name__
            raise TrackingUnavailable(f"MLflow tracking server {self.uri} stopped answering ({reason}); not "
                                      f"delivered to run {run_id}: {what}") from None

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [self._Param(k, v) for k, v in params.items()]
        with self._delivering(run_id, f"params {_names(params)}"):
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [self._Metric(k, v, now, step) for k, v in metrics.items()]
        with self._delivering(run_id, f"metrics {_names(metrics)} (step {step})"):
            for i in range(0, len(items), 1000):
                self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        with self._delivering(run_id, f"tags {_names(tags)}"):
            self.client.log_batch(run_id, tags=[self._RunTag(k, v) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, folder: str | None) -> None:
        with self._delivering(run_id, f"artifact {folder + '/' if folder else ''}{path.name}"):
            self.client.log_artifact(run_id, str(path), folder)

    def end(self, run_id: str, status: str) -> None:
        with self._delivering(run_id, f"status {status}"):
            self.client.set_terminated(run_id, status)

    def reopen(self, run_id: str) -> Run:
        self.client.update_run(run_id, status="RUNNING")
        return Run.continued(self, run_id)

    def read_artifact(self, run_id: str, path: str) -> str | None:
        # Through this client, which knows the tracking URI a server's proxied (mlflow-artifacts:) URIs need.
        with tempfile.TemporaryDirectory() as tmp:
            local = self.download_artifact(run_id, path, Path(tmp))
            return local.read_text() if local is not None else None

    def _has_artifact(self, run_id: str, path: str) -> bool:
        """Whether the run lists ``path`` (a file or a folder) among its artifacts."""
        folder = path.rpartition("/")[0] or None
        return any(a.path == path for a in self.client.list_artifacts(run_id, folder))

    def download_artifact(self, run_id: str, path: str, dest: Path) -> Path | None:
        if not self._has_artifact(run_id, path):
            return None
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dest)))

    def delete_artifacts(self, run_id: str, path: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        if self._has_artifact(run_id, path):
            repository = get_artifact_repository(self.client.get_run(run_id).info.artifact_uri, tracking_uri=self.uri)
            repository.delete_artifacts(path)

    def previous_arm_run(self, arm: str, before: str) -> RunInfo | None:
        runs = self.client.search_runs([self.experiment_id], f"tags.arm = '{arm}' and attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=20)
        return next((self._info(r) for r in runs if r.info.run_id != before), None)

    def _info(self, run: Any, experiment: str | None = None) -> RunInfo:
        experiment = experiment or self.client.get_experiment(run.info.experiment_id).name
        return RunInfo(run.info.run_id, run.info.run_name or "", run.info.status, experiment, dict(run.data.tags),
                       dict(run.data.params), dict(run.data.metrics))

    def info(self, run_id: str) -> RunInfo:
        import mlflow

        try:
            return self._info(self.client.get_run(run_id))
        except mlflow.exceptions.MlflowException:
            raise UserError(f"no run {run_id!r} in MLflow store {self.uri}") from None

    def children(self, parent_id: str) -> list[RunInfo]:
        parent = self.client.get_run(parent_id)
        runs = self.client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                       max_results=10000)
        experiment = self.client.get_experiment(parent.info.experiment_id).name
        return [self._info(r, experiment) for r in runs]

    def runs_of_kind(self, experiment: str, kind: str, *, finished_only: bool = True, limit: int = 50) -> list[RunInfo]:
        """Runs tagged ``kind`` (experiment parents, studies) in the named experiment, newest first: only
        finished ones, or (``finished_only=False``) interrupted and running ones too."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        query = f"tags.kind = '{kind}'" + (" and attributes.status = 'FINISHED'" if finished_only else "")
        runs = self.client.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"],
                                       max_results=limit)
        return [self._info(r, experiment) for r in runs]

    def metric_steps(self, run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


class FolderTracker(Tracker):
    """``<root>/<experiment>/<run_id>/``: params.json, metrics.jsonl, tags.json, meta.json, artifacts/."""

    def __init__(self, base: Path, experiment: str | None) -> None:
        self.base = base
        self.root = base
        self.description = f"local folder {base}"
        if experiment is not None:
            self.use_experiment(experiment)

    def use_experiment(self, name: str) -> None:
        self.root = self.base / name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.root}: cannot create the run folder ({exc.strerror})") from None

    def _path(self, run_id: str, name: str) -> Path:
        return self.root / run_id / name

    def _update(self, run_id: str, name: str, values: dict[str, Any]) -> None:
        path = self._path(run_id, name)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(values)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)

    def start(self, name: str, tags: dict[str, str], parent: Run | None = None) -> Run:
        run_id = uuid.uuid4().hex
        (self.root / run_id / "artifacts").mkdir(parents=True)
        self._update(run_id, "meta.json", {"run_name": name, "status": "RUNNING", "start_time": time.time(),
                                           "parent_run_id": parent.run_id if parent else None})
        self._update(run_id, "tags.json", {**tags, "mlflow.runName": name})
        return Run(self, run_id)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self._update(run_id, "params.json", params)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        with open(self._path(run_id, "metrics.jsonl"), "a") as f:
            for key, value in metrics.items():
                f.write(json.dumps({"key": key, "value": value, "step": step, "timestamp": time.time()}) + "\n")

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._update(run_id, "tags.json", tags)

    def log_artifact(self, run_id: str, path: Path, folder: str | None) -> None:
        target = self._path(run_id, "artifacts") / (folder or "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / path.name)

    def end(self, run_id: str, status: str) -> None:
        self._update(run_id, "meta.json", {"status": status, "end_time": time.time()})

    def _read(self, run_id: str, name: str) -> dict[str, Any]:
        path = self._path(run_id, name)
        return json.loads(path.read_text()) if path.exists() else {}

    def reopen(self, run_id: str) -> Run:
        self._update(run_id, "meta.json", {"status": "RUNNING"})
        return Run.continued(self, run_id)

    def read_artifact(self, run_id: str, path: str) -> str | None:
        file = self._path(run_id, "artifacts") / path
        return file.read_text() if file.is_file() else None

    def download_artifact(self, run_id: str, path: str, dest: Path) -> Path | None:
        file = self._path(run_id, "artifacts") / path
        if not file.is_file():
            return None
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(file, dest / path))

    def delete_artifacts(self, run_id: str, path: str) -> None:
        target = self._path(run_id, "artifacts") / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def previous_arm_run(self, arm: str, before: str) -> RunInfo | None:
        runs = [self.info(m.parent.name) for m in self.root.glob("*/meta.json") if m.parent.name != before]
        runs = [r for r in runs if r.tags.get("arm") == arm and r.status == "FINISHED"]
        started = {r.run_id: self._read(r.run_id, "meta.json").get("start_time", 0) for r in runs}
        return max(runs, key=lambda r: started[r.run_id], default=None)

    def _records(self, run_id: str) -> list[dict[str, Any]]:
        path = self._path(run_id, "metrics.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def metric_steps(self, run_id: str, key: str) -> dict[int, float]:
        return {r["step"]: r["value"] for r in self._records(run_id) if r["key"] == key}

    def info(self, run_id: str) -> RunInfo:
        if not (self.root / run_id / "meta.json").is_file():
            found = sorted(self.base.glob(f"*/{run_id}/meta.json"))
            if not found:
                raise UserError(f"no run {run_id!r} under {self.base}")
            self.root = found[0].parent.parent
        meta = self._read(run_id, "meta.json")
        metrics = {r["key"]: r["value"] for r in self._records(run_id)}
        return RunInfo(run_id, meta.get("run_name", ""), meta.get("status", ""), self.root.name,
                       self._read(run_id, "tags.json"), self._read(run_id, "params.json"), metrics)

    def children(self, parent_id: str) -> list[RunInfo]:
        found = []
        for meta in self.root.glob("*/meta.json"):
            if json.loads(meta.read_text()).get("parent_run_id") == parent_id:
                found.append(self.info(meta.parent.name))
        return found


def _file_uri_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path))


DEFAULT_STORE = "mlruns"


def file_store_path(uri: str) -> Path | None:
    """The folder of an MLflow file store (``file:`` URI or a plain path), else None."""
    if uri.startswith("file:"):
        return _file_uri_path(uri)
    return Path(uri) if ":" not in uri else None


RUN_FOLDERS = ("metrics", "params", "tags", "artifacts")


def restore_empty_folders(store: Path) -> None:
    """Git keeps no empty folder, and MLflow's file store reports a run whose ``metrics/`` (or ``params/``,
    ``tags/``, ``artifacts/``) folder is missing as not found: a committed run that has logged no metric
    yet (an experiment's parent until its arms finish) would vanish from every clone. Recreate them."""
    for meta in store.glob("*/*/meta.yaml"):
        for name in RUN_FOLDERS:
            (meta.parent / name).mkdir(exist_ok=True)


def keep_relocatable(uri: str, experiment_id: str) -> None:
    """A file store named by a relative path (the default ``mlruns``, the committed record) keeps a relative
    artifact location, so its runs' artifacts resolve in any clone. MLflow's file store writes the absolute
    path of the folder it was created in; this rewrites that one field of the new experiment's meta.yaml,
    once, with MLflow's own YAML helpers. Runs created afterwards inherit the relative location."""
    root = file_store_path(uri)
    if root is None or root.is_absolute():
        return
    from mlflow.utils.file_utils import read_yaml, write_yaml

    folder = root / experiment_id
    meta = read_yaml(str(folder), "meta.yaml")
    meta["artifact_location"] = folder.as_posix()
    write_yaml(str(folder), "meta.yaml", meta, overwrite=True)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to the database, in ``artifacts/``."""
    db = _sqlite_path(uri)
    return (db.parent / "artifacts").resolve().as_uri() if db is not None else None


def make_tracker(uri: str | None, experiment: str | None, local_dir: str = "harness_runs") -> Tracker:
    """``none`` -> local folder; anything else (default: the file store ``./mlruns``) -> MLflow."""
    if uri is not None and uri.lower() == "none":
        return FolderTracker(Path(local_dir), experiment)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for one-line errors
    store = file_store_path(uri)
    if store is not None:
        # MLflow 3 refuses its file store unless asked: the record is one, chosen for files that git can add.
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    local = store or _sqlite_path(uri)
    if local is not None:
        folder = local if store is not None else local.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"{folder}: MLflow store is not writable ({exc.strerror})") from None
    if store is not None:
        restore_empty_folders(store)
    if uri.startswith(("http://", "https://")):
        wait_for_server(uri)
    return MlflowTracker(uri, experiment)


def wait_for_server(uri: str, budget: float = 20.0) -> None:
    """A tracking server must answer its health check within ``budget`` seconds (retried with backoff),
    before anything trains; MLflow's own client would retry each call for minutes."""
    import urllib.error
    import urllib.request

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    deadline, delay, problem = time.monotonic() + budget, 0.5, ""
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        if time.monotonic() + delay > deadline:
            raise UserError(f"MLflow tracking server {uri} is unreachable ({problem}; retried for {budget:.0f} s)")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
