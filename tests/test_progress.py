"""What a person sees on a terminal while a stage runs and when it ends."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

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


def on_a_terminal(code: str) -> str:
    """What `code` writes to a pseudo-terminal, raw."""
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=child, stdout=child, stderr=child, cwd=REPO,
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
    return out.decode()


def test_the_spinner_is_erased_before_the_stage_says_done() -> None:
    raw = on_a_terminal(STAGE)
    assert "|" in raw or "/" in raw, "no spinner was drawn"
    shown = screen(raw.replace("\r\n", "\n"))
    done = [line for line in shown if "bootstrap and packages: done" in line]
    assert len(done) == 1 and done[0].split(" ", 1)[1].startswith("    bootstrap"), shown
    assert not any(line.startswith(("|", "/", "-", "\\")) for line in shown), shown


BARS = r"""
import os, sys
assert os.isatty(2), "progress bars are drawn on a terminal only"
for pct in (10.0, 55.5, 100.0):
    sys.stderr.write(f"\x1b[2Kinstalling:   {pct:6.2f} [####      ]\r")
sys.stderr.write("\x1b[2Kdone\n")
print("I: a line that is not progress")
"""


def test_run_hands_progress_bars_over_and_keeps_other_lines() -> None:
    from imagesmith.host.run import run
    from imagesmith.stages.bootstrap import report_progress

    seen: list[str] = []

    def progress(line: str) -> bool:
        seen.append(line)
        return report_progress(line)

    run([sys.executable, "-c", BARS], progress=progress)
    assert seen[:4] == [
        "installing:    10.00 [####      ]",
        "installing:    55.50 [####      ]",
        "installing:   100.00 [####      ]",
        "done",
    ]
    assert seen[-1] == "I: a line that is not progress"


def test_without_a_terminal_progress_is_a_few_plain_lines(capsys: object) -> None:
    from imagesmith import log

    with log.stage("bootstrap and packages"):
        for pct in range(0, 101, 5):
            log.progress("installing", float(pct))
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    lines = [line.split(" ", 1)[1] for line in err.splitlines() if "installing" in line]
    assert lines == [
        "    installing 0%",
        "    installing 25%",
        "    installing 50%",
        "    installing 75%",
        "    installing 100%",
    ]


GROWING = """
import sys, tempfile, time
from pathlib import Path
from imagesmith import log
path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "disk"
with log.stage("assemble disk"), log.watch_growth("mkfs.ext4", path, 8 << 20):
    with path.open("wb") as f:
        for _ in range(8):
            f.write(b"x" * (1 << 20)); f.flush(); time.sleep(0.3)
path.unlink()
if len(sys.argv) == 1:
    path.parent.rmdir()
"""


def test_a_silent_tool_shows_the_bytes_it_has_written_on_a_terminal() -> None:
    raw = on_a_terminal(GROWING)
    shown = screen(raw.replace("\r\n", "\n"))
    assert "mkfs.ext4" in raw and "GiB of about 0.01 GiB" in raw, raw
    percents = [int(p) for p in re.findall(r"mkfs\.ext4\s+(\d+)%", raw)]
    assert percents and percents == sorted(percents) and max(percents) <= 99, percents
    assert len(set(percents)) > 1, "the percentage never moved"
    assert not any("mkfs.ext4" in line for line in shown), "erased before done"


def test_a_silent_tool_without_a_terminal_logs_a_few_lines(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", GROWING, str(tmp_path / "disk")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "mkfs.ext4" in line]
    assert 2 <= len(lines) <= 4, result.stderr
    assert all(re.search(r"mkfs\.ext4 \d+% \(0\.\d\d GiB of about 0\.01 GiB\)$", x) for x in lines)
