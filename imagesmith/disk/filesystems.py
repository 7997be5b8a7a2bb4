"""Filesystems made straight from a tree into the disk file, at their offsets.

- The ESP (FAT32) by mkfs.vfat at its offset, filled by mtools.
- An ext4 root by `mkfs.ext4 -E offset= -d TREE` (always with an explicit
  size, or mke2fs would run to the end of the file and overwrite the backup
  GPT).
- A btrfs root written by the kernel where a loop device can be had
  (`fill_btrfs`: an empty btrfs, every path copied in, as fast again), else
  by `mkfs.btrfs --rootdir` in a file of its own, then copied to its
  offset, holes kept.
"""

from __future__ import annotations

import os
from pathlib import Path

from imagesmith import log
from imagesmith.config.layout import Partition
from imagesmith.config.settings import AUTO_HEADROOM, MiB
from imagesmith.disk import incremental
from imagesmith.disk.sparse import copy_sparse, scratch_file
from imagesmith.errors import BuildError
from imagesmith.host.run import run

INODE_SIZE = 256
# ext4/btrfs metadata and slack on top of the files themselves.
FS_OVERHEAD = 1.15
FS_FIXED_OVERHEAD = 96 * MiB
# IMAGESMITH_KERNEL_FILL=0: every btrfs by mkfs.btrfs --rootdir, as before.
FILL_SWITCH = "IMAGESMITH_KERNEL_FILL"


def tree_size(path: Path) -> int:
    """Bytes the files of a tree occupy (allocated blocks, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512 + INODE_SIZE
    return total


def make_esp(disk: Path, esp: Partition, tree: Path, *, scratch: Path | None = None) -> None:
    """The ESP, a FAT32 holding `tree`, into its partition of `disk`. Made in
    a file of its own in `scratch` (the disk's directory by default) and
    copied in: mkfs.vfat syncs the file it writes, which would wait for a
    root still being copied into the disk."""
    with scratch_file(scratch or disk.parent, ".esp-", esp.size) as image:
        run(
            [
                "mkfs.vfat", "-F", "32", "-s", "1", "-n", esp.label, "-i", esp.fs_uuid,
                os.fspath(image), str(esp.size // 1024),
            ],
            what="mkfs.vfat (ESP)",
        )  # fmt: skip
        entries = sorted(tree.iterdir()) if tree.is_dir() else []
        if entries:
            run(
                ["mcopy", "-s", "-p", "-m", "-i", os.fspath(image), *map(os.fspath, entries), "::/"],
                env={"MTOOLS_SKIP_CHECK": "1"},
                what="mcopy (ESP)",
            )  # fmt: skip
        copy_sparse(image, disk, offset=esp.start)


def make_ext4(disk: Path, part: Partition, tree: Path) -> None:
    run(
        [
            # metadata_csum_seed: a new UUID on first boot changes only the
            # superblock, not every checksum (see the class new-fs-uuid).
            "mkfs.ext4", "-q", "-F", "-L", part.label, "-U", part.fs_uuid, "-O", "metadata_csum_seed",
            "-E", f"offset={part.start},root_owner=0:0", "-d", os.fspath(tree),
            os.fspath(disk), f"{part.size // 1024}k",
        ],
        what="mkfs.ext4 (root)",
    )  # fmt: skip


def make_btrfs_image(image: Path, part: Partition, tree: Path, *, size: int | None) -> int:
    """A btrfs of `tree` in the file `image`; returns the filesystem's size.

    With `size`, the filesystem is that big. mkfs.btrfs --rootdir makes the
    file bigger when the tree needs more room, so a returned size above
    `size` means the tree does not fit. With None, the filesystem is as small
    as its content (`--shrink`): systemd-growfs grows it on first boot.
    """
    with image.open("wb") as f:
        f.truncate(size or 0)
    run(
        [
            "mkfs.btrfs", "-q", "-f", "-L", part.label, "-U", part.fs_uuid,
            "--rootdir", os.fspath(tree), *([] if size else ["--shrink"]), os.fspath(image),
        ],
        what="mkfs.btrfs (root)",
    )  # fmt: skip
    return image.stat().st_size


def fill_btrfs(
    disk: Path, part: Partition, tree: Path, *, offset: int, scratch: Path,
    paths: list[bytes] | None = None,
) -> None:  # fmt: skip
    """A btrfs of `tree`, `part.size` bytes, at `offset` in `disk`, written by
    the kernel instead of by `mkfs.btrfs --rootdir`: mkfs.btrfs makes it
    empty in a sparse scratch file, whose few written blocks are copied in,
    then host/copyin.py copies every path of the tree into it through a loop
    device, one process per core. For the desktop's 4.3 GiB tree: 24 s
    against 47 s for btrfs-progs 6.2's --rootdir, and its chunks are
    filled, not a third empty. Needs a loop device: raises BuildError where
    there is none, or when the tree does not fit (the caller then makes it
    with mkfs.btrfs). `paths`: the tree's, sorted, when the caller has them."""
    with scratch_file(scratch, "empty-btrfs-", part.size) as empty:
        run(
            ["mkfs.btrfs", "-q", "-f", "-L", part.label, "-U", part.fs_uuid, os.fspath(empty)],
            what="mkfs.btrfs (empty root)",
        )
        if not disk.exists():
            disk.touch()
        copy_sparse(empty, disk, offset=offset)
    everything = sorted(incremental.tree_state(tree)) if paths is None else paths
    incremental.apply_changes(
        disk, offset, tree, incremental.Changes(everything, [], 0), size=part.size, uuid="",
        what="copying the tree into a new btrfs", scratch=scratch,
    )  # fmt: skip


def kernel_filled(
    disk: Path, part: Partition, tree: Path, *, offset: int, scratch: Path,
    paths: list[bytes] | None = None,
) -> bool:  # fmt: skip
    """`fill_btrfs` unless IMAGESMITH_KERNEL_FILL=0; False where it could not
    (said in the log, the disk cut back to `offset`): mkfs.btrfs is then
    the caller's to run."""
    if os.environ.get(FILL_SWITCH) == "0":
        return False
    try:
        fill_btrfs(disk, part, tree, offset=offset, scratch=scratch, paths=paths)
    except BuildError as e:
        if disk.exists():
            os.truncate(disk, offset)
        said = e.message.splitlines()[0]
        log.info(f"    the kernel could not write the btrfs ({said}); mkfs.btrfs makes it")
        return False
    return True


def fill_size(tree_bytes: int) -> int:
    """The size of a btrfs `fill_btrfs` makes for a tree of `tree_bytes`
    (tree_size) with size = "auto": the files, btrfs's metadata (DUP) and
    the room its 1 GiB data chunks leave, and AUTO_HEADROOM, in MiB."""
    wanted = int(tree_bytes * FS_OVERHEAD) + FS_FIXED_OVERHEAD + AUTO_HEADROOM
    return -(-wanted // MiB) * MiB


def place_image(image: Path, disk: Path, part: Partition) -> None:
    """A filesystem image into its partition of the disk, holes kept."""
    copy_sparse(image, disk, offset=part.start)
