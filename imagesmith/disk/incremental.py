"""A btrfs root made from a cached btrfs of the package stage plus what the
build changed, instead of from the whole tree.

`mkfs.btrfs --rootdir` costs a minute for a desktop's 4 GB tree, however
little changed. The package stage's tree is the same for every build with
its key, so its btrfs is made once and cached (cache/filesystems.py). A build
then:

1. marks the time when the tree is still exactly the cached one (`mark`);
2. customises, sets up boot and finalises as ever;
3. lists what changed since the mark, by ctime, which no tool in the tree
   can set back, and what is gone, against the cached path list (`changes`);
4. copies the cached filesystem into the disk at the root's offset while
   the classes work. Meanwhile it copies the filesystem's metadata alone
   (its metadata and system chunks and superblocks, a tenth of a desktop's
   filesystem, holes elsewhere) into a scratch file and gives it this
   build's UUID there (`metadata_copy`; btrfstune -U rewrites every tree
   block: 3 s for a desktop);
5. through a loop device over that scratch file, applies the changes
   chrooted into it, in a mount namespace of its own, so no path leads out
   of the image and nothing stays mounted or attached whatever happens to
   the build (`apply_changes`, host/copyin.py);
6. once the copy is done, lays what the scratch file holds over it. The
   disk's SHA-256 is computed from the pieces meanwhile
   (disk/sparse.py `sha256_with_overlay`), not read again afterwards.

Without a readable chunk tree, step 5 runs on the copy itself, after it.

Step 5 needs a loop device. Where there is none, the caller
makes the whole filesystem as before: loop devices are never required.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from imagesmith.disk.sparse import copy_sparse_range
from imagesmith.host.overlay import UpperLayer
from imagesmith.host.run import run

# Unallocated room for btrfs to put the changes in; holes in the file.
SLACK = 1024**3
CHANGE_OVERHEAD = 1.25
# The superblock and its mirrors; btrfstune rewrites those within the device.
SUPERBLOCKS = (64 * 1024, 64 * 1024**2, 256 * 1024**3)
SUPERBLOCK_SIZE = 4096


@dataclass(frozen=True)
class Changes:
    changed: list[bytes]  # paths relative to the tree, made or changed since the mark
    removed: list[bytes]  # paths of the cached tree that are gone
    changed_bytes: int


def mark(scratch: Path) -> int:
    """The filesystem clock now, in ns: what changes later has a later ctime.
    `scratch` is a directory on the tree's filesystem (its timestamps are
    coarse, so the mark is read from a file there, then a tick is waited)."""
    probe = scratch / ".imagesmith-mark"
    probe.touch()
    stamp = probe.stat().st_ctime_ns
    probe.unlink()
    time.sleep(0.02)
    return stamp


def tree_state(tree: Path) -> dict[bytes, tuple[int, int]]:
    """{relative path: (ctime in ns, size)} for everything in the tree."""
    out = run(
        ["find", tree, "-mindepth", "1", "-printf", "%P\\0%C@\\0%s\\0"],
        capture=True,
        what="listing the tree",
    ).stdout
    fields = out.split(b"\0")
    state = {}
    for i in range(0, len(fields) - 2, 3):
        seconds, _, fraction = fields[i + 1].partition(b".")
        ctime = int(seconds) * 10**9 + int((fraction + b"000000000")[:9])
        state[fields[i]] = (ctime, int(fields[i + 2]))
    return state


def changes(tree: Path, since: int, cached_paths: set[bytes]) -> Changes:
    state = tree_state(tree)
    changed = [path for path, (ctime, _) in state.items() if ctime >= since]
    removed = list(cached_paths - state.keys())  # host/copyin.py orders both
    return Changes(changed, removed, sum(state[path][1] for path in changed))


def overlay_changes(tree: Path, upper: UpperLayer, cached_paths: set[bytes]) -> Changes | None:
    """`changes()` read from an overlay's upper layer instead of a walk of
    the whole tree: what the build wrote is there, and whiteouts say what it
    removed. None where the upper layer cannot say it all: a written file
    with other hard links (its other names are copied up only when looked
    up), so the caller walks the tree."""
    ordered = sorted(cached_paths)
    # A removed directory goes with what was in it; a directory made anew
    # (opaque) hides all its lower content, but for what the build wrote in it.
    removed = {p for gone in upper.removed for p in [gone, *under(ordered, gone)]}
    for directory in upper.opaque:
        inside = upper.files | upper.directories
        removed.update(p for p in under(ordered, directory) if p not in inside)
    changed, changed_bytes = [*upper.directories], 0
    top = os.fsencode(tree)
    for path in upper.files:
        st = os.lstat(top + b"/" + path)
        if stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                return None
            changed_bytes += st.st_size
        changed.append(path)
    return Changes(changed, sorted(removed & cached_paths), changed_bytes)


def under(ordered: list[bytes], directory: bytes) -> list[bytes]:
    """The paths below `directory` in the sorted list `ordered`."""
    prefix = directory + b"/"
    start = bisect.bisect_left(ordered, prefix)
    end = bisect.bisect_left(ordered, directory + b"0")  # "0" sorts right after "/"
    return ordered[start:end]


def apply_changes(
    disk: Path, offset: int, tree: Path, found: Changes, *, size: int, uuid: str,
    fstype: str = "btrfs", what: str = "applying the build's changes to the cached btrfs",
    scratch: Path | None = None,
) -> None:  # fmt: skip
    """Turn the copy of the cached filesystem at `offset` in `disk` into the
    filesystem of `tree`: `size` bytes (a btrfs grows to it), the UUID
    `uuid`, the changes applied (host/copyin.py, in a mount namespace of its
    own). Its lists and mount point go in `scratch` (default: beside the tree)."""
    if disk.stat().st_size < offset + size:
        os.truncate(disk, offset + size)
    work = Path(tempfile.mkdtemp(prefix="apply-", dir=scratch or tree.parent))
    try:
        (work / "changed").write_bytes(b"".join(path + b"\0" for path in found.changed))
        (work / "removed").write_bytes(b"".join(path + b"\0" for path in found.removed))
        (work / "mnt").mkdir()
        run(
            ["unshare", "--mount", "--propagation", "private",
             sys.executable, "-m", "imagesmith.host.copyin", fstype, disk, str(offset), str(size), uuid,
             work / "mnt", tree, work / "changed", work / "removed"],
            what=what,
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def metadata_ranges(image: Path) -> list[tuple[int, int]]:
    """(offset, length) of everything `btrfstune -U` may rewrite in the
    single-device btrfs `image`: the stripes of its metadata and system
    chunks, read from its chunk tree, and its superblocks. Empty when the
    chunk tree says nothing usable."""
    listing = run(
        ["btrfs", "inspect-internal", "dump-tree", "-t", "chunk", image],
        capture=True,
        what="reading the cached btrfs's chunk tree",
    ).stdout.decode(errors="replace")
    ranges, kinds, kind, length = [], set(), "", 0
    for line in listing.splitlines():
        if chunk := re.search(r"\blength (\d+) owner \d+ stripe_len \d+ type (\S+)", line):
            length, kind = int(chunk[1]), chunk[2]
        elif (stripe := re.search(r"\bstripe \d+ devid 1 offset (\d+)", line)) and (
            "METADATA" in kind or "SYSTEM" in kind
        ):
            ranges.append((int(stripe[1]), length))
            kinds.add(kind)
    if not any("METADATA" in k for k in kinds):
        return []
    size = image.stat().st_size
    return ranges + [(at, SUPERBLOCK_SIZE) for at in SUPERBLOCKS if at + SUPERBLOCK_SIZE <= size]


def metadata_copy(image: Path, target: Path, uuid: str) -> bool:
    """Make `target` a sparse file the size of `image` holding only its
    metadata, with the filesystem UUID `uuid` (btrfstune -U on a tenth of
    the data). False, and nothing made, when the chunk tree says nothing
    usable. Changes applied to it (`apply_changes`) need no file data: every
    changed file is written anew, and a btrfs never reads a file's blocks to
    write, move or remove it. Laid over a copy of `image`, what it holds is
    the new filesystem."""
    ranges = metadata_ranges(image)
    if not ranges:
        return False
    with target.open("wb") as f:
        f.truncate(image.stat().st_size)
    for offset, length in ranges:
        copy_sparse_range(image, target, src_offset=offset, length=length, dst_offset=offset)
    run(["btrfstune", "-f", "-U", uuid, target], capture=True, what="btrfstune -U (metadata)")
    return True
