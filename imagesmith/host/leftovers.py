"""What a dead build left: found by the owner's PID in the name, removed only
when that process is gone.

A build names every scratch place it makes with its PID: the work directory
(`imagesmith-NAME-pidPID-XXXX`, in /dev/shm or beside the outputs), the
build-only sources (`/var/tmp/imagesmith-build-pidPID-HEX`) and the outputs
being written (`OUT/.imagesmith-tmp-PID-NAME`). A build that is killed
(SIGKILL, the OOM killer, a CI timeout) cannot remove them, so the next build
and `imagesmith cache prune` do: each name's PID is checked, and only a
name whose process no longer exists is removed. A live build's files, and
names of any other form, are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_dead_owners(directory: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Remove entries of `directory` whose name matches `pattern` (group 1 is
    the owner's PID) and whose owner is gone; returns what was removed."""
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        match = pattern.match(name)
        if not match or process_alive(int(match.group(1))):
            continue
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
