"""Stage: assemble the disk image from the trees, with no devices or mounts.

Needs: `ctx.tree`, `ctx.esp_tree`, `ctx.bios_dir`, `ctx.layout`. Disk images
only; for a container image this stage returns at once.
Produces: `ctx.disk`, a sparse raw GPT disk image.

- The GPT is written by sfdisk on a plain file.
- The ESP (UEFI) is made by mkfs.vfat at its offset and filled by mtools.
- For a BIOS, GRUB's core.img goes into the BIOS boot partition and boot.img
  into the protective MBR's boot code (biosboot.py).
- An ext4 root is made by `mkfs.ext4 -E offset= -d TREE` straight into the
  disk file (always with an explicit size, or mke2fs would run to the end of
  the file and overwrite the backup GPT).
- A btrfs root is made by `mkfs.btrfs --rootdir` in a file of its own,
  then copied to its offset, holes kept.

No loop devices, no partition device nodes, no device-mapper, no mounts.
"""

from __future__ import annotations

import os
from pathlib import Path

from imagesmith.biosboot import install_bios_boot
from imagesmith.context import BuildContext
from imagesmith.errors import ConfigError
from imagesmith.layout import DiskLayout, Partition
from imagesmith.run import run
from imagesmith.settings import format_size

# ext4/btrfs metadata and slack on top of the files themselves.
FS_OVERHEAD = 1.15
FS_FIXED_OVERHEAD = 96 * 1024 * 1024
INODE_SIZE = 256
CHUNK = 8 * 1024 * 1024


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


def check_tree_fits(ctx: BuildContext) -> None:
    used = tree_size(ctx.tree)
    need = int(used * FS_OVERHEAD) + FS_FIXED_OVERHEAD
    have = ctx.layout.root.size
    if need > have:
        shortfall = need - have
        raise ConfigError(
            f"{ctx.image.config_space / 'imagesmith.toml'} [images.{ctx.image.name}] size: "
            f"the root filesystem needs about {format_size(need)} but the "
            f"{format_size(ctx.image.settings.size)} disk leaves {format_size(have)}",
            hint=f"raise size by at least {format_size(shortfall)}",
        )


def sfdisk_script(layout: DiskLayout) -> str:
    lines = ["label: gpt", f"label-id: {layout.disk_uuid}", "unit: sectors", ""]
    for p in layout.partitions:
        lines.append(
            f"start={p.start_sector}, size={p.size_sectors}, type={p.type_uuid}, "
            f'uuid={p.uuid}, name="{p.name}"'
        )
    return "\n".join(lines) + "\n"


def write_partition_table(disk: Path, layout: DiskLayout) -> None:
    with disk.open("wb") as f:
        f.truncate(layout.size)
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", os.fspath(disk)],
        input=sfdisk_script(layout).encode(),
        what="sfdisk",
    )


def make_esp(disk: Path, esp: Partition, tree: Path) -> None:
    run(
        [
            "mkfs.vfat", "-F", "32", "-s", "1", "-n", esp.label, "-i", esp.fs_uuid,
            f"--offset={esp.start_sector}", os.fspath(disk), str(esp.size // 1024),
        ],
        what="mkfs.vfat (ESP)",
    )  # fmt: skip
    entries = sorted(tree.iterdir()) if tree.is_dir() else []
    if entries:
        run(
            ["mcopy", "-s", "-p", "-m", "-i", f"{os.fspath(disk)}@@{esp.start}", *map(os.fspath, entries), "::/"],
            env={"MTOOLS_SKIP_CHECK": "1"},
            what="mcopy (ESP)",
        )  # fmt: skip


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


def make_btrfs(disk: Path, part: Partition, tree: Path, scratch: Path) -> None:
    image = scratch / "root.btrfs"
    with image.open("wb") as f:
        f.truncate(part.size)
    try:
        run(
            [
                "mkfs.btrfs", "-q", "-f", "-L", part.label, "-U", part.fs_uuid,
                "--rootdir", os.fspath(tree), os.fspath(image),
            ],
            what="mkfs.btrfs (root)",
        )  # fmt: skip
        copy_sparse(image, disk, offset=part.start)
    finally:
        image.unlink(missing_ok=True)


def copy_sparse(source: Path, target: Path, *, offset: int) -> None:
    """Copy the data regions of `source` into `target` at `offset`, skipping holes."""
    copy_sparse_range(source, target, src_offset=0, length=source.stat().st_size, dst_offset=offset)


def copy_sparse_range(
    source: Path, target: Path, *, src_offset: int, length: int, dst_offset: int = 0
) -> None:
    """Copy `length` bytes of `source` from `src_offset` to `target` at
    `dst_offset`, skipping holes so sparse files stay sparse."""
    with source.open("rb") as src, target.open("r+b") as dst:
        end = src_offset + length
        position = src_offset
        while position < end:
            try:
                data = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:  # no more data after position
                break
            if data >= end:
                break
            hole = min(os.lseek(src.fileno(), data, os.SEEK_HOLE), end)
            copy_range(
                src.fileno(), dst.fileno(), data, dst_offset + data - src_offset, hole - data
            )
            position = hole


def copy_range(src: int, dst: int, src_pos: int, dst_pos: int, length: int) -> None:
    """Copy bytes between two files; in-kernel where the filesystems allow it."""
    while length > 0:
        try:
            copied = os.copy_file_range(src, dst, length, src_pos, dst_pos)
        except OSError:  # EXDEV and friends: tmpfs to disk on older kernels
            copied = os.pwrite(dst, os.pread(src, min(length, CHUNK), src_pos), dst_pos)
        if copied == 0:
            raise OSError(f"short copy at offset {src_pos}")
        length -= copied
        src_pos += copied
        dst_pos += copied


def assemble_disk(ctx: BuildContext) -> None:
    if ctx.image.target != "disk":
        return
    check_tree_fits(ctx)
    layout = ctx.layout
    write_partition_table(ctx.disk, layout)
    if (esp := layout.partition("esp")) is not None:
        make_esp(ctx.disk, esp, ctx.esp_tree)
    if (bios_boot := layout.bios_boot) is not None:
        install_bios_boot(ctx.disk, bios_boot, ctx.bios_dir / "boot.img", ctx.bios_dir / "core.img")
    if layout.root.filesystem == "btrfs":
        make_btrfs(ctx.disk, layout.root, ctx.tree, ctx.workdir)
    else:
        make_ext4(ctx.disk, layout.root, ctx.tree)
