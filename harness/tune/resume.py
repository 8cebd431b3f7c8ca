"""Trials that outlive a session: an interrupted trial is continued from its checkpoint by a new trial.

A task-0 trial on a 2-core CPU trains for up to an hour, and a session ends when it ends. Optuna never
reopens a trial once it has failed, so a continuation is a new trial with the old one's parameters,
marked ``continues`` = the old trial's number. It trains on in the old trial's MLflow run from that run's
last checkpoint, and it first reports the old trial's per-epoch values to Optuna again, so the pruner
judges the whole curve (under Hyperband the new number may fall into another bracket).

A trial counts as interrupted when its process stopped it (SIGINT: the objective marks it and Optuna
records it FAIL) or when its process is gone while Optuna still has it RUNNING (SIGKILL, a machine that
went away): on this host its pid no longer exists, or, from any host, it has sent no heartbeat (one per
epoch) for ``stale_after`` seconds. A trial that failed for any other reason (a diverged loss) is not
continued.
"""

from __future__ import annotations

import os
import socket
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

RUN_ATTR = "mlflow_run_id"  # the trial's MLflow run (a continuation's is its predecessor's)
WORKER_ATTR = "worker"  # host:pid of the process training the trial
HEARTBEAT_ATTR = "heartbeat"  # unix time of the trial's last reported epoch
INTERRUPTED_ATTR = "interrupted"  # why the trial stopped before its end
CONTINUES_ATTR = "continues"  # the number of the interrupted trial this one continues
STALE_AFTER = 3600.0  # default: a trial silent this long on another host is taken for gone


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def is_abandoned(trial: FrozenTrial, now: float, stale_after: float) -> bool:
    """A RUNNING trial nobody trains any more: its process on this host is gone, or its heartbeat is stale."""
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _process_exists(int(pid)):
        return True
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - float(trial.user_attrs.get(HEARTBEAT_ATTR, started)) > stale_after


def fail_abandoned(study: optuna.Study, stale_after: float = STALE_AFTER) -> list[int]:
    """Mark abandoned RUNNING trials interrupted and FAIL (what Optuna's ``fail_stale_trials`` does for
    storages with a heartbeat; the journal file has none). Returns their numbers."""
    now = time.time()
    gone = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_abandoned(trial, now, stale_after):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, "its process is gone")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another process finished it first
            continue
        gone.append(trial.number)
    return gone


def enqueue_continuations(study: optuna.Study) -> list[int]:
    """Queue one continuation for every interrupted trial that has none yet; returns the trials' numbers.
    Optuna hands queued trials out before it samples new ones."""
    trials = study.get_trials(deepcopy=False)
    continued = {t.user_attrs.get(CONTINUES_ATTR) for t in trials}
    todo = [t for t in trials if t.state == TrialState.FAIL and INTERRUPTED_ATTR in t.user_attrs
            and t.number not in continued]
    for trial in todo:
        attrs = {CONTINUES_ATTR: trial.number, **({RUN_ATTR: trial.user_attrs[RUN_ATTR]} if RUN_ATTR in trial.user_attrs
                                                  else {})}
        study.enqueue_trial(trial.params, user_attrs=attrs)
    return [t.number for t in todo]


def replay(trial: optuna.Trial, values: dict[int, float], until: int) -> None:
    """Report the predecessor's per-epoch values up to epoch ``until`` (its checkpoint's) to this trial."""
    for step in sorted(s for s in values if s <= until):
        trial.report(values[step], step)
