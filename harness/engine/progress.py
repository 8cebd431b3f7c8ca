"""Progress over arms, tasks and epochs: a tqdm bar with ETA on a terminal, plain lines otherwise."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total_epochs: int, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.stream, self.enabled, self.total = stream, enabled, max(total_epochs, 1)
        self.done, self.start = 0, time.monotonic()
        self.log: TextIO | None = None  # the current arm's log file, logged as an artifact
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            # A terminal that reports a 0 x 0 size (some ptys) would hide the bar: fall back to 100 x 20.
            size = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(total=self.total, file=stream, unit="epoch", ncols=size.columns, nrows=size.lines)

    def epoch(self, arm: str, task: int, tasks: int, epoch: int, epochs: int, loss: float, acc: float, lr: float) -> None:
        self.done += 1
        text = f"{arm} task {task + 1}/{tasks} epoch {epoch + 1}/{epochs} loss {loss:.4f} acc {acc:.3f} lr {lr:.4g}"
        self._to_log(text)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(text, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total} {elapsed:.0f}s eta {eta:.0f}s] {text}", file=self.stream, flush=True)

    def _to_log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self.log.flush()

    def note(self, text: str) -> None:
        self._to_log(text)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
