"""Where the harness keeps files of its own on this machine, outside any tracking store."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$HARNESS_CACHE``, else ``$XDG_CACHE_HOME/harness`` (``~/.cache/harness``): decoded images, run work."""
    root = os.environ.get("HARNESS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "harness")
    return Path(root).expanduser()


def run_work_dir(run_id: str) -> Path:
    """The one place a run's checkpoints and its log in progress live: ``<cache>/runs/<run_id>``. It is outside
    every tracking store, so a committed record never carries checkpoints, and a resume started from any
    directory finds them."""
    return cache_dir() / "runs" / run_id
