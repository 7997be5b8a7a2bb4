"""The one way imagesmith runs an external command.

`run()` takes an argv list (never a shell string), logs it in a form you can
paste into a shell, times it, keeps the tail of its output for the error
message, and makes sure the child is gone before an exception leaves: on
Ctrl-C the child gets SIGTERM, then SIGKILL.

Every child is started through `setpriv --pdeathsig KILL`, so it dies with
the thread that started it however imagesmith ends, SIGKILL and OOM kills
included. Commands with children of their own (mmdebstrap, the image
sandbox) run in a PID namespace under `unshare --kill-child`, so killing the
direct child takes down everything it started. After `stop_all_processes()`
(Ctrl-C, SIGTERM, SIGHUP), `run()` starts nothing more, in any thread.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from imagesmith import log
from imagesmith.errors import BuildError, ConfigError

TAIL_LINES = 25
# Every child run() has started and not yet reaped, for stop_all_processes().
_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()
# Environment variables that hold secrets: never passed to a child.
# Secrets the build reads from its own environment and hands to no command:
# the token PIN for signing (host/signing.py passes it in a private file) and
# the remote cache's password (cache/remote.py writes a private auth file).
_hidden_env: set[str] = {"IMAGESMITH_PKCS11_PIN", "IMAGESMITH_CACHE_REMOTE_PASSWORD"}
_stopping = False
# Prefix of every command: the child gets SIGKILL when its parent thread dies.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


def format_command(argv: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(os.fspath(a) for a in argv)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: bytes | None = None,
    capture: bool = False,
    interactive: bool = False,
    check: bool = True,
    what: str = "",
    progress: Callable[[str], bool] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; raise BuildError naming `what` (or the command) on failure.

    With `capture`, stdout is returned and stderr is kept for errors. Without
    it, stdout and stderr are merged, shown in verbose mode and their tail is
    kept for errors. `interactive` hands the terminal to the command.
    With `progress`, the output goes through a pseudo-terminal, so a tool that
    draws progress bars only on a terminal (mmdebstrap) does; each line or
    redrawn bar is handed to `progress` as plain text; the lines it does not
    take as progress are kept for errors.
    """
    args = [os.fspath(a) for a in argv]
    log.debug(f"$ {format_command(args)}")
    full_env = child_environment(env)
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    terminal = -1
    if progress is not None:
        terminal, child_end = pseudo_terminal()
        streams: dict[str, Any] = {
            "stdin": subprocess.DEVNULL,
            "stdout": child_end,
            "stderr": child_end,
        }
    elif interactive:
        streams = {"stdin": None, "stdout": None, "stderr": None}
    else:
        streams = {
            "stdin": subprocess.PIPE if input is not None else subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE if capture else subprocess.STDOUT,
        }
    with _running_lock:  # no start after stop_all_processes() took its snapshot
        try:
            if _stopping:
                raise KeyboardInterrupt
            proc = start(args, streams, env=full_env, cwd=cwd)
        except BaseException:
            if terminal >= 0:
                os.close(terminal)
            raise
        finally:
            if terminal >= 0:
                os.close(streams["stdout"])  # the child's end: ours is `terminal`
        _running.add(proc)
    try:
        if terminal >= 0 and progress is not None:
            out, err = read_terminal(proc, terminal, tail, progress)
        else:
            out, err = communicate(proc, input, tail, capture=capture, interactive=interactive)
    except BaseException:
        stop_process(proc)
        raise
    finally:
        with _running_lock:
            _running.discard(proc)
    elapsed = time.monotonic() - started
    log.debug(f"    ({elapsed:.1f}s, exit {proc.returncode})")
    if check and proc.returncode != 0:
        label = what or os.path.basename(args[0])
        detail = "\n".join(f"  | {line}" for line in tail)
        raise BuildError(
            f"{label} failed with exit code {proc.returncode}\n"
            f"  command: {format_command(args)}\n{detail}"
        )
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def hide_from_children(name: str) -> None:
    """Keep the environment variable `name` (a secret the build read) out of
    every command run() starts from now on: maintainer scripts never see it."""
    with _running_lock:
        _hidden_env.add(name)


def child_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    with _running_lock:
        hidden = set(_hidden_env)
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(extra or {})
    return env


def start(
    args: list[str], streams: dict[str, Any], *, env: dict[str, str] | None, cwd: Path | None
) -> subprocess.Popen[bytes]:
    if shutil.which(args[0], path=(env or os.environ).get("PATH")) is None and "/" not in args[0]:
        raise ConfigError(
            f"host tool {args[0]!r} not found",
            hint="run `make setup` (or install the package that provides it)",
        )
    try:
        return subprocess.Popen([*DIE_WITH_PARENT, *args], **streams, env=env, cwd=cwd)
    except FileNotFoundError as e:
        raise ConfigError(
            f"host tool {args[0]!r} not found",
            hint="run `make setup` (or install the package that provides it)",
        ) from e


def communicate(
    proc: subprocess.Popen[bytes],
    input: bytes | None,
    tail: collections.deque[str],
    *,
    capture: bool,
    interactive: bool,
) -> tuple[bytes, bytes]:
    """Feed stdin and read the output until the child exits: (stdout, stderr)
    when captured; else the merged output goes to `tail` and the debug log."""
    if interactive:
        proc.wait()
        return b"", b""
    if capture:
        out, err = proc.communicate(input)
        tail.extend(err.decode(errors="replace").splitlines())
        return out, err
    # stdin is written by another thread while this one reads: a child that
    # fills its output pipe before reading all its input cannot deadlock us.
    writer = threading.Thread(target=feed_stdin, args=(proc, input), daemon=True)
    writer.start()
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        log.debug(f"    {line}")
    proc.wait()
    writer.join()
    return b"", b""


TERMINAL_COLUMNS = 100
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def pseudo_terminal() -> tuple[int, int]:
    """(our end, the child's end) of a pseudo-terminal TERMINAL_COLUMNS wide."""
    ours, theirs = os.openpty()
    fcntl.ioctl(theirs, termios.TIOCSWINSZ, struct.pack("HHHH", 40, TERMINAL_COLUMNS, 0, 0))
    return ours, theirs


def read_terminal(
    proc: subprocess.Popen[bytes],
    terminal: int,
    tail: collections.deque[str],
    progress: Callable[[str], bool],
) -> tuple[bytes, bytes]:
    """Read a child's pseudo-terminal until it closes: every line, and every
    progress bar redrawn after a \\r, as text without escape sequences."""
    pending = b""
    try:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the child's end is closed
                break
            if not chunk:
                break
            pending += chunk
            *pieces, pending = re.split(rb"[\r\n]", pending)
            for piece in pieces:
                text = ANSI.sub(b"", piece).decode(errors="replace").strip()
                if text and not progress(text):
                    tail.append(text)
                    log.debug(f"    {text}")
    finally:
        os.close(terminal)
    proc.wait()
    return b"", b""


def feed_stdin(proc: subprocess.Popen[bytes], input: bytes | None) -> None:
    if input is None or proc.stdin is None:
        return
    try:
        proc.stdin.write(input)
    except BrokenPipeError:
        pass  # the child stopped reading; its exit code says how it went
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """Terminate a child and wait for it, escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def stop_all_processes() -> None:
    """Stop every command run() is running, in any thread (on Ctrl-C), and
    refuse to start new ones from here on."""
    global _stopping
    with _running_lock:
        _stopping = True
        running = list(_running)
    for proc in running:
        stop_process(proc)


def require_tools(*tools: str) -> None:
    """Fail early, before any slow work, when a host tool is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ConfigError(
            f"missing host tool(s): {', '.join(missing)}",
            hint="run `make setup`, which installs the host packages imagesmith needs",
        )
