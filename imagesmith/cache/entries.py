"""Cache entries: written atomically, locked per key, leftovers recognised.

An entry is a directory `KIND/KEY/` in the cache directory. It is written
under a temporary name beside it (`.tmp-KEY-TOKEN-PID`) and renamed into
place only when complete, so a reader never sees half an entry. A lock file
per key (`.tmp-KEY.lock`) serialises the builds that want the same entry.
A temporary directory whose process is gone is a leftover of an interrupted
build, which `imagesmith cache prune` removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CacheUse:
    """Which entry a build used, and whether it was there (for the manifest)."""

    key: str
    hit: bool
    # The remote stage cache's part, when one is set: "hit" (pulled), "pushed",
    # "missed" (a pull-only runner), "not asked" (the local cache had it), or
    # what went wrong, e.g. "rejected: ..." for an entry that failed a check.
    remote: str = ""


@contextlib.contextmanager
def locked(kind_dir: Path, key: str) -> Iterator[None]:
    """Hold the lock of `key` in `kind_dir` (made if missing) for the block."""
    kind_dir.mkdir(parents=True, exist_ok=True)
    with (kind_dir / f"{TEMP_PREFIX}{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def new_entry(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds, it becomes
    `final`. An entry another build stored first is kept, unless `replace`."""
    temp = final.with_name(f"{TEMP_PREFIX}{final.name}-{secrets.token_hex(4)}-{os.getpid()}")
    temp.mkdir(parents=True)
    try:
        yield temp
        if replace:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(temp, final)
        except OSError:  # another build stored the same key first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def leftovers(kind_dir: Path) -> list[Path]:
    """Temporary entries in `kind_dir` whose build process is gone."""
    found = []
    for path in kind_dir.glob(f"{TEMP_PREFIX}*") if kind_dir.is_dir() else []:
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            found.append(path)
    return found
