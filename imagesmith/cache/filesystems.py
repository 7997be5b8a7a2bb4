"""The filesystem cache: the package stage's tree as a ready btrfs or ext4.

Making a btrfs of a desktop's 4 GB tree costs a minute, and a one-file change
made it again; an ext4 of a server's costs a second and a half. An entry
here is that filesystem for one package-stage entry, made once from the tree
exactly as the stage cache restores it, before any class touched it:

- `root.img`: the filesystem: a btrfs as small as its content
  (`mkfs.btrfs --shrink`), an ext4 the size of the root partition;
- `paths`: every path of that tree, NUL-separated, for finding what a build
  removed;
- `digest.json` (cache/entries.py), checked while the image is copied out.

The key is the package stage's key, the filesystem, the label (and an ext4's
size), and the mkfs that made it: a new btrfs-progs or e2fsprogs makes a new
entry. disk/incremental.py applies a
build's changes to a copy of the entry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from imagesmith.cache import entries
from imagesmith.host.run import run

FILESYSTEMS_DIR = "filesystems"
IMAGE_FILE = "root.img"
PATHS_FILE = "paths"
ENTRY_FILE = "entry.json"
# Bump when what an entry holds, or how it is made, changes.
FORMAT = 2  # 2: a btrfs written by the kernel, the root's size unless "auto"


VERSION_ARGV = {"btrfs": ["mkfs.btrfs", "--version"], "ext4": ["mke2fs", "-V"]}


@functools.cache
def mkfs_version(filesystem: str) -> str:
    """The host's mkfs version lines for `filesystem` (asked once per process)."""
    argv = VERSION_ARGV[filesystem]
    found = run(argv, capture=True, what=" ".join(argv))
    return (found.stdout + found.stderr).decode(errors="replace").strip()


def filesystem_key(
    stage_key: str, *, label: str, tool: str, filesystem: str, size: int | None
) -> str:
    """The entry's key; `size` None for a root sized "auto" (a btrfs then
    has the size its content needs)."""
    inputs: dict[str, object] = {
        "stage": stage_key,
        "filesystem": filesystem,
        "label": label,
        "mkfs": tool,
        "format": FORMAT,
        "size": size,
    }
    canonical = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:32]


def kind_dir(cache_dir: Path) -> Path:
    return cache_dir / FILESYSTEMS_DIR


def entry_dir(cache_dir: Path, key: str) -> Path:
    return kind_dir(cache_dir) / key


def locked(cache_dir: Path, key: str) -> contextlib.AbstractContextManager[None]:
    return entries.locked(kind_dir(cache_dir), key)


def usable_entry(cache_dir: Path, key: str) -> Path | None:
    """The entry when it is there and its files have their recorded sizes
    (the SHA-256 is checked while the image is copied out)."""
    entry = entry_dir(cache_dir, key)
    if not entry.is_dir():
        return None
    if problem := entries.digest_problem(entry, known={}):
        entries.discard(entry, problem)
        return None
    os.utime(entry)  # last used, for pruning
    return entry


@contextlib.contextmanager
def new_filesystem(
    cache_dir: Path, key: str, info: dict[str, object], known: Mapping[str, str]
) -> Iterator[Path]:
    """Yield the temporary entry to make `root.img` and `paths` in; stored
    with its digests when the block succeeds (those the block put in
    `known` are taken as they are)."""
    with entries.new_entry(entry_dir(cache_dir, key)) as temp:
        yield temp
        entries.write_digests(temp, [IMAGE_FILE, PATHS_FILE], known)
        # Just hashed as it stands: its first use need not hash it again.
        entries.note_verified(temp, IMAGE_FILE)
        record = {"key": key, "created": time.time(), **info}
        (temp / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")


def recorded_paths(entry: Path) -> set[bytes]:
    return set(filter(None, (entry / PATHS_FILE).read_bytes().split(b"\0")))
