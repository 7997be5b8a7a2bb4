"""The cached package-stage tree as the build's tree, without copying it.

A build used to extract its package stage's tar (4.4 GB for a desktop) into
its work directory: 8 s in RAM, a minute on disk. Instead the entry keeps the
tree unpacked once (cache/stages.py), and the build's tree is an overlay
mount of it: the cached tree is the read-only lower layer, and whatever the
build writes goes to an upper directory in its work directory. Nothing is
copied until a file is written, and the cached tree is never changed.

The mount is made in a mount namespace of imagesmith's own, entered once
when the `build` command starts (`enter_private_namespace`): the build
host's namespace never sees it, and when imagesmith ends, however it ends,
the kernel drops it. Where a private namespace or overlayfs is not to be had
(a container without CAP_SYS_ADMIN, an old kernel, a path overlayfs cannot
take), the build extracts the tar as before. `IMAGESMITH_TREE_OVERLAY=0`
turns the overlay off.

`index=on` keeps hard links: writing one name of a hard-linked lower file
copies the inode up once, and every name shows the change, as in a tree of
its own.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from imagesmith.host.enter import LIBC, MS_PRIVATE, MS_REC, mount

SWITCH = "IMAGESMITH_TREE_OVERLAY"
CLONE_NEWNS = 0x00020000
MNT_DETACH = 2
OPAQUE = "trusted.overlay.opaque"
# Characters overlayfs or the mount options would read as separators.
UNSAFE_IN_PATH = set(",:\\=\n")

_private = False


def enter_private_namespace() -> bool:
    """Move this process into a mount namespace of its own, private to the
    host's; True when it is there. Only while single-threaded: a thread that
    unshares takes only itself along, so later threads could not see mounts."""
    global _private
    if _private:
        return True
    if os.environ.get(SWITCH) == "0" or threading.active_count() > 1:
        return False
    if LIBC.unshare(CLONE_NEWNS) != 0:
        return False
    try:
        mount("none", "/", None, MS_REC | MS_PRIVATE)
    except OSError:
        return False
    _private = True
    return True


def usable(*paths: Path) -> bool:
    """Whether a tree can be an overlay here: the namespace is private and
    no path holds a character the mount options would misread."""
    return _private and not any(UNSAFE_IN_PATH & set(os.fspath(p)) for p in paths)


def mount_overlay(lower: Path, scratch: Path, target: Path) -> None:
    """Mount `lower` read-only under `target` (made, empty), with the
    writes in `scratch`/upper; raises OSError when the kernel refuses."""
    upper, work = upper_dir(scratch), scratch / "work"
    for path in (upper, work, target):
        path.mkdir(mode=0o755, parents=True)
    # The upper root takes the lower root's owner and mode, as a copy would.
    st = lower.stat()
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)
    options = f"lowerdir={lower},upperdir={upper},workdir={work},index=on"
    mount("overlay", os.fspath(target), "overlay", 0, options)


def unmount(target: Path) -> None:
    """Detach the overlay at `target` (no error when nothing is mounted)."""
    LIBC.umount2(os.fspath(target).encode(), MNT_DETACH)


def upper_dir(scratch: Path) -> Path:
    return scratch / "upper"


@dataclass(frozen=True)
class UpperLayer:
    """What the build did to the tree, as the overlay's upper layer records
    it (relative paths, as bytes)."""

    files: frozenset[bytes]  # made or written: everything but directories
    directories: frozenset[bytes]  # made, or changed, or holding a change
    removed: frozenset[bytes]  # whiteouts: lower paths the build removed
    opaque: frozenset[bytes]  # directories made anew: nothing of the lower one shows


def upper_layer(scratch: Path) -> UpperLayer:
    top = os.fsencode(upper_dir(scratch))
    files, directories, removed, opaque = set(), set(), set(), set()
    pending = [top]
    while pending:
        with os.scandir(pending.pop()) as listing:
            for entry in listing:
                rel = entry.path[len(top) + 1 :]
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    directories.add(rel)
                    with contextlib.suppress(OSError):
                        if os.getxattr(entry.path, OPAQUE, follow_symlinks=False) == b"y":
                            opaque.add(rel)
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    removed.add(rel)
                else:
                    files.add(rel)
    return UpperLayer(
        frozenset(files), frozenset(directories), frozenset(removed), frozenset(opaque)
    )


def written_files(scratch: Path) -> frozenset[str]:
    """Relative paths of the files the build made or wrote in the overlay,
    not directories and not removals."""
    return frozenset(os.fsdecode(path) for path in upper_layer(scratch).files)
