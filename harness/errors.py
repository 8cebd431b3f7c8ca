"""Errors a user can cause. The command-line entry points turn them into one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input (experiment file, data folder, path) rather than in the harness."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid experiment or method file: names the file and the dotted key."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key, self.source, self.message = key, source, message
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(UserError):
    """Missing, truncated or corrupt dataset files."""


class TrainingDiverged(UserError):
    """A non-finite loss; names arm, task, epoch and step."""


class TrackingUnavailable(UserError):
    """The tracking server stopped answering mid-run; names what was not delivered. Nothing is written to the
    tracker after it: the arm stops with its checkpoint, and ``--resume`` logs the rest."""


class Interrupted(Exception):
    """SIGINT arrived; the current step finished and a checkpoint was written."""
