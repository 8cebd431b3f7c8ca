"""Progress: a bar with ETA on a terminal (a real pseudo-terminal here), plain lines otherwise."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

from harness.engine.progress import Progress
from tests.conftest import ROOT

SCRIPT = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from harness.engine.progress import Progress
p = Progress(30)
for i in range(3):
    p.epoch("gem", 0, 1, i, 3, 0.5, 0.9, 0.1)
    for _ in range(10):
        p.step(128)
        time.sleep(0.01)
p.close()
"""


def test_bar_with_eta_on_a_terminal() -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while select.select([master], [], [], 10)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=30) == 0
    text = out.decode(errors="replace")
    assert "gem task 1/1 epoch 3/3" in text and "30/30 [" in text and "img/s" in text, text


def test_plain_lines_every_interval_not_every_step_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(400, stream=stream, interval=0.05)
    progress.epoch("gem", 1, 5, 0, 2, 0.25, 0.75, 0.01)
    for _ in range(200):  # 200 steps in well under a second: a handful of lines, not 200
        progress.step(64)
    time.sleep(0.06)
    progress.step(64)
    progress.note("a note")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 6, lines
    assert lines[-3].startswith("[") and "/400 steps" in lines[-3] and "eta" in lines[-3] and "img/s" in lines[-3]
    assert "gem task 2/5 epoch 1/2 loss 0.2500" in lines[-3]
    assert lines[-2] == "a note" and lines[-1].startswith("[201/400 steps")


def test_skipped_steps_leave_the_total() -> None:
    stream = io.StringIO()
    progress = Progress(400, stream=stream, interval=3600)
    progress.skip(150)  # e.g. a resumed experiment's finished arm
    for _ in range(250):
        progress.step(64)
    progress.close()
    assert stream.getvalue().splitlines()[-1].startswith("[250/250 steps"), stream.getvalue()
