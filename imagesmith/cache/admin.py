"""`imagesmith cache`: list and prune the caches in the cache directory.

The cache directory (`build.default_cache_dir()`) holds:

| folder | what | reused when |
| --- | --- | --- |
| `stages/KEY/` | package-stage trees (cache/stages.py) | the package-stage key matches |
| `initramfs/KEY/` | built initramfs images (cache/initramfs.py) | nothing they hold changed |
| `filesystems/KEY/` | the package stage's tree as a btrfs (cache/filesystems.py) | its stage entry is restored |
| `debs/SUITE-ARCH/` | downloaded .debs | always; apt picks what it needs |

`prune` removes stage and initramfs entries not used for longer than
`--max-age`, then the least recently used ones until the total is under
`--max-size`, and always the leftovers of interrupted builds. `--all`
empties every cache, .debs included. An entry whose key lock a build holds
(it is being restored, built or saved) is skipped, not removed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from imagesmith.cache import entries
from imagesmith.cache.entries import TEMP_PREFIX
from imagesmith.cache.filesystems import FILESYSTEMS_DIR
from imagesmith.cache.initramfs import INITRAMFS_DIR
from imagesmith.cache.stages import STAGES_DIR
from imagesmith.config.settings import format_size
from imagesmith.errors import ConfigError

KINDS = {STAGES_DIR: "stage", INITRAMFS_DIR: "initramfs", FILESYSTEMS_DIR: "filesystem"}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 86400}


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "stage", "initramfs" or "debs"
    name: str
    path: Path
    size: int
    last_used: float


def parse_age(value: str) -> float:
    """'30d', '12h', '90m', '45s' or a number of days, in seconds."""
    match = _DURATION_RE.match(value)
    if not match:
        raise ConfigError(f"--max-age: expected a duration like 30d or 12h, got {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def disk_usage(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def list_entries(cache_dir: Path) -> list[CacheEntry]:
    entries = []
    for folder, kind in KINDS.items():
        root = cache_dir / folder
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            if path.name.startswith(TEMP_PREFIX) or not path.is_dir():
                continue
            entries.append(
                CacheEntry(kind, path.name, path, disk_usage(path), path.stat().st_mtime)
            )
    debs = cache_dir / "debs"
    if debs.is_dir():
        for path in sorted(p for p in debs.iterdir() if p.is_dir()):
            files = list(path.glob("*.deb"))
            newest = max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)
            entries.append(CacheEntry("debs", path.name, path, disk_usage(path), newest))
    return entries


def leftovers(cache_dir: Path) -> list[Path]:
    """Temporary entries of interrupted builds whose process is gone."""
    return [path for folder in KINDS for path in entries.leftovers(cache_dir / folder)]


def prune(
    cache_dir: Path,
    *,
    max_age: float | None = None,
    max_size: int | None = None,
    everything: bool = False,
    now: float | None = None,
) -> list[CacheEntry]:
    """Remove what the policy says; returns the entries removed."""
    now = time.time() if now is None else now
    for path in leftovers(cache_dir):
        shutil.rmtree(path, ignore_errors=True)
    entries = list_entries(cache_dir)
    if everything:
        doomed = entries
    else:
        prunable = sorted((e for e in entries if e.kind != "debs"), key=lambda e: e.last_used)
        doomed = [e for e in prunable if max_age is not None and now - e.last_used > max_age]
        if max_size is not None:
            total = sum(e.size for e in entries if e not in doomed)
            for entry in prunable:
                if total <= max_size:
                    break
                if entry not in doomed:
                    doomed.append(entry)
                    total -= entry.size
    removed = [entry for entry in doomed if remove_entry(entry)]
    forget_stale_locks(cache_dir)
    return removed


def remove_entry(entry: CacheEntry) -> bool:
    """Remove an entry under its key lock; False when a build holds it."""
    if entry.kind == "debs":  # apt locks its own archive directory
        shutil.rmtree(entry.path, ignore_errors=True)
        return True
    with entries.forgettable(entry.path.parent, entry.name) as got:
        if got:
            shutil.rmtree(entry.path, ignore_errors=True)
            entries.forget_key(entry.path.parent, entry.name)
        return got


def forget_stale_locks(cache_dir: Path) -> None:
    """Remove the lock files of keys without an entry that no build holds:
    one per key ever built or tried would pile up otherwise."""
    for folder in KINDS:
        kind_dir = cache_dir / folder
        for key in entries.lock_keys(kind_dir):
            if (kind_dir / key).is_dir():
                continue
            with entries.forgettable(kind_dir, key) as got:
                if got and not (kind_dir / key).is_dir():
                    entries.forget_key(kind_dir, key)


def format_age(seconds: float) -> str:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor:
            return f"{seconds / factor:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_entries(entries: list[CacheEntry], *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'KIND':<10} {'ENTRY':<34} {'SIZE':>10} {'UNUSED':>7}"]
    for e in entries:
        lines.append(
            f"{e.kind:<10} {e.name:<34} {format_size(e.size):>10} {format_age(now - e.last_used):>7}"
        )
    lines.append(f"{len(entries)} entries, {format_size(sum(e.size for e in entries))} in all")
    return "\n".join(lines)
