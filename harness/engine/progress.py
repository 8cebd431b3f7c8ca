"""Progress over arms, tasks, epochs and steps.

On a terminal: a tqdm bar that advances every training step, with images per second and an ETA from the
measured step rate. Elsewhere (a log file, CI, nohup): one plain line every ``interval`` seconds with the
same numbers, so a long epoch is never a silent gap and a short one never floods the log. Every epoch's
summary line goes to the arm's log either way.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    """``total_steps``: optimisation steps of the whole command (every arm, seed, task and epoch)."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 30.0) -> None:
        stream = sys.stderr if stream is None else stream  # at call time, so a redirected stderr is honoured
        self.stream, self.enabled, self.total = stream, enabled, max(total_steps, 1)
        self.interval = interval
        self.done, self.images, self.start = 0, 0, time.monotonic()
        self.last_line = self.start
        self.text = ""
        self.log: TextIO | None = None  # the current arm's log file, logged as an artifact
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            # A terminal that reports a 0 x 0 size (some ptys) would hide the bar: fall back to 100 x 20.
            size = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(total=self.total, file=stream, unit="step", ncols=size.columns, nrows=size.lines,
                            bar_format="{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}] {desc}")

    def step(self, images: int) -> None:
        """One optimisation step on ``images`` training images finished."""
        self.done += 1
        self.images += images
        if not self.enabled:
            return
        if self.bar is not None:
            if self.done % 10 == 0 or self.done == self.total:
                self.bar.set_postfix_str(f"{self.rate():.0f} img/s", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._line()

    def skip(self, steps: int) -> None:
        """``steps`` of the total that this command will not run (a resumed experiment's finished arms and
        the epochs its checkpoints already hold): the ETA then counts only what is left."""
        self.total = max(self.total - steps, 1)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def rate(self) -> float:
        return self.images / max(time.monotonic() - self.start, 1e-9)

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        print(f"[{self.done}/{self.total} steps {elapsed:.0f}s eta {eta:.0f}s {self.rate():.0f} img/s] {self.text}",
              file=self.stream, flush=True)

    def epoch(self, arm: str, task: int, tasks: int, epoch: int, epochs: int, loss: float, acc: float, lr: float) -> None:
        self.text = f"{arm} task {task + 1}/{tasks} epoch {epoch + 1}/{epochs} loss {loss:.4f} acc {acc:.3f} lr {lr:.4g}"
        self._to_log(self.text)
        if self.bar is not None:
            self.bar.set_description(self.text, refresh=True)

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
        elif self.enabled and self.done:
            self._line()  # the last state, whenever the previous line was
