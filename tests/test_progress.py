"""Progress: a bar with ETA on a terminal (a real pseudo-terminal here), plain lines otherwise."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys

from harness.engine.progress import Progress
from tests.conftest import ROOT

SCRIPT = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from harness.engine.progress import Progress
p = Progress(3)
for i in range(3):
    p.epoch("gem", 0, 1, i, 3, 0.5, 0.9, 0.1)
    time.sleep(0.15)
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
    assert "gem task 1/1 epoch 3/3" in text and "3/3 [" in text and "epoch/s" in text, text


def test_plain_lines_with_eta_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream=stream)
    progress.epoch("gem", 1, 5, 0, 2, 0.25, 0.75, 0.01)
    progress.note("a note")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/4 ") and "eta" in lines[0] and "gem task 2/5 epoch 1/2 loss 0.2500" in lines[0]
    assert lines[1] == "a note"
