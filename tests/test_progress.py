"""What a person sees on a terminal while a stage runs and when it ends."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from tests.conftest import REPO

STAGE = """
import time
from imagesmith import log
with log.stage("bootstrap and packages"):
    time.sleep(0.8)
log.info("next line")
"""


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: \\r returns, ESC[K erases to the end."""
    lines, line, col = [], "", 0
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            line, i = line[:col], i + 3
            continue
        char = raw[i]
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append(line)
            line, col = "", 0
        else:
            line = line[:col] + char + line[col + 1 :]
            col += 1
        i += 1
    return lines + ([line] if line else [])


def test_the_spinner_is_erased_before_the_stage_says_done() -> None:
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGE], stdin=child, stdout=child, stderr=child, cwd=REPO,
    )  # fmt: skip
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait()
    os.close(parent)
    raw = out.decode()
    assert "|" in raw or "/" in raw, "no spinner was drawn"
    shown = screen(raw.replace("\r\n", "\n"))
    done = [line for line in shown if "bootstrap and packages: done" in line]
    assert len(done) == 1 and done[0].split(" ", 1)[1].startswith("    bootstrap"), shown
    assert not any(line.startswith(("|", "/", "-", "\\")) for line in shown), shown
