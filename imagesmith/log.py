"""Logging and stage timing.

On a terminal, a long stage shows a spinner line with elapsed time; elsewhere
(CI, pipes) every message is a plain timestamped line. When several images
build at once, each line names its image (`prefix()`) and there is no
spinner.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_verbose = False


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


def is_verbose() -> bool:
    return _verbose


_thread = threading.local()


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


@contextlib.contextmanager
def prefix(name: str) -> Iterator[None]:
    """Lines logged by this thread in the block start with [name]."""
    previous = getattr(_thread, "prefix", "")
    _thread.prefix = f"[{name}] "
    try:
        yield
    finally:
        _thread.prefix = previous


def _in_worker() -> bool:
    return threading.current_thread() is not threading.main_thread()


_write_lock = threading.Lock()


def info(message: str) -> None:
    _clear_spinner()
    line = f"{_stamp()} {getattr(_thread, 'prefix', '')}{message}\n"
    # One write per line, under a lock: builds in other threads log too.
    with _write_lock:
        sys.stderr.write(line)
        sys.stderr.flush()


def debug(message: str) -> None:
    if _verbose:
        info(message)


def warn(message: str) -> None:
    info(f"warning: {message}")


_spinner_lock = threading.Lock()
_spinner_active: list[str] = []


def _clear_spinner() -> None:
    if _spinner_active and sys.stderr.isatty():
        with _spinner_lock:
            sys.stderr.write("\r\033[K")


class _Spinner(threading.Thread):
    def __init__(self, label: str) -> None:
        super().__init__(daemon=True)
        self.label = label
        self.detail = ""  # what progress() last said
        self.stop = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        frames = "|/-\\"
        n = 0
        while not self.stop.wait(0.25):
            elapsed = time.monotonic() - self.started
            detail = f"  {self.detail}" if self.detail else ""
            with _spinner_lock:
                sys.stderr.write(f"\r\033[K{frames[n % 4]} {self.label} {elapsed:5.1f}s{detail}")
                sys.stderr.flush()
            n += 1


PROGRESS_STEP = 25  # percent between plain progress lines when there is no spinner


def progress(status: str, percent: float, detail: str = "") -> None:
    """How far the current stage's long step is ("installing", 62.5; a
    detail such as bytes written). On a terminal the spinner line shows it;
    elsewhere a plain line is logged when the step changes and at every
    PROGRESS_STEP percent."""
    tail = f" ({detail})" if detail else ""
    spinner = getattr(_thread, "spinner", None)
    if spinner is not None:
        spinner.detail = f"{status} {percent:3.0f}%{tail}"
        return
    mark = (status, int(percent // PROGRESS_STEP))
    if getattr(_thread, "progress_mark", None) != mark:
        _thread.progress_mark = mark
        info(f"    {status} {percent:.0f}%{tail}")


GROWTH_INTERVAL = 0.5  # seconds between looks at a growing file


@contextlib.contextmanager
def watch_growth(status: str, path: Path, total: int) -> Iterator[None]:
    """While the block runs, show how many of about `total` bytes the file
    at `path` holds (its allocated blocks) as the stage's progress: a tool
    that says nothing while it writes (mkfs, qemu-img) still shows how far it
    is. The percentage stops at 99 until the block ends: `total` is an
    estimate."""
    spinner = getattr(_thread, "spinner", None)
    line_prefix = getattr(_thread, "prefix", "")
    stop = threading.Event()

    def watch() -> None:
        _thread.spinner, _thread.prefix, _thread.progress_mark = spinner, line_prefix, None
        while not stop.wait(GROWTH_INTERVAL):
            try:
                done = os.stat(path).st_blocks * 512
            except OSError:
                continue
            percent = min(99.0, 100.0 * done / total) if total > 0 else 0.0
            progress(status, percent, f"{_gib(done)} of about {_gib(total)}")

    watcher = threading.Thread(target=watch, daemon=True, name=f"watch {path.name}")
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB"


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Log the start and duration of a stage; record it into `timings`."""
    info(f"==> {name}")
    started = time.monotonic()
    spinner = None
    if sys.stderr.isatty() and not _verbose and not _in_worker():
        spinner = _Spinner(name)
        _spinner_active.append(name)
        _thread.spinner = spinner
        spinner.start()
    _thread.progress_mark = None
    ok = False
    try:
        yield
        ok = True
    finally:
        if spinner is not None:
            spinner.stop.set()
            spinner.join()
            _thread.spinner = None
            _clear_spinner()  # while it still counts as active, or nothing is erased
            _spinner_active.remove(name)
        elapsed = time.monotonic() - started
        if timings is not None:
            timings[name] = round(elapsed, 2)
        info(f"    {name}: {'done' if ok else 'FAILED'} in {elapsed:.1f}s")
