"""Stage: assemble the disk image from the trees, with no devices or mounts.

Needs: `ctx.tree`, `ctx.esp_tree`, `ctx.bios_dir`, `ctx.layout`. Disk images
only; for a container image this stage returns at once.
Produces: `ctx.disk`, a sparse raw GPT disk image:

- the GPT, written by sfdisk on a plain file (disk/gpt.py);
- the ESP (UEFI), made by mkfs.vfat at its offset and filled by mtools;
- for a BIOS, GRUB's core.img in the BIOS boot partition and boot.img in the
  protective MBR's boot code (disk/biosboot.py);
- the root filesystem, ext4 or btrfs, made straight from the tree
  (disk/filesystems.py).

No loop devices, no partition device nodes, no device-mapper, no mounts.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from imagesmith import log
from imagesmith.config.layout import disk_size_for, resized
from imagesmith.config.settings import AUTO_HEADROOM, AUTO_SIZE, format_size
from imagesmith.context import BuildContext
from imagesmith.disk.biosboot import install_bios_boot
from imagesmith.disk.filesystems import (
    FS_FIXED_OVERHEAD,
    FS_OVERHEAD,
    fill_size,
    kernel_filled,
    make_btrfs_image,
    make_esp,
    make_ext4,
    place_image,
    tree_size,
)
from imagesmith.disk.gpt import write_partition_table
from imagesmith.disk.sparse import sha256_with_placed
from imagesmith.errors import ConfigError
from imagesmith.host.background import in_background
from imagesmith.stages.filesystem_base import (
    content_estimate,
    finish_root_from_base,
    root_from_base,
)


def check_tree_fits(ctx: BuildContext) -> None:
    """Fail before any writing when the tree does not fit; with size =
    "auto", size the disk to the tree instead."""
    used = tree_size(ctx.tree)
    need = int(used * FS_OVERHEAD) + FS_FIXED_OVERHEAD
    if ctx.image.settings.size == AUTO_SIZE:
        ctx.layout = resized(ctx.layout, disk_size_for(ctx.layout, need + AUTO_HEADROOM))
        log.info(
            f"    size auto: {format_size(used)} of files, a {format_size(ctx.layout.size)} disk"
        )
        return
    have = ctx.layout.root.size
    if need > have:
        raise too_small(ctx, need)


def too_small(ctx: BuildContext, need: int) -> ConfigError:
    have = ctx.layout.root.size
    return ConfigError(
        f"{ctx.image.config_space / 'imagesmith.toml'} [images.{ctx.image.name}] size: "
        f"the root filesystem needs about {format_size(need)} but the "
        f"{format_size(ctx.image.settings.size)} disk leaves {format_size(have)}",
        hint=f'raise size by at least {format_size(need - have)}, or set size = "auto"',
    )


def make_btrfs_root(ctx: BuildContext, image: Path) -> bool:
    """The btrfs root, before the disk's partition table is written: from
    the filesystem cache, or written by the kernel, straight into the disk
    when it can (True), else made whole in `image` by mkfs.btrfs, to be
    placed (False). With size = "auto", the disk is sized to it plus
    headroom: the filesystem's real size, not an estimate, except for the
    kernel's, which is made the estimate's size (`fill_size`, the headroom
    inside it) and falls back to mkfs.btrfs if the tree does not fit it."""
    auto = ctx.image.settings.size == AUTO_SIZE
    made, headroom = root_from_base(ctx), AUTO_HEADROOM
    if made is None and (made := filled_root(ctx)) is not None:
        headroom = 0
    placed = made is not None
    if made is None:
        with log.watch_growth("mkfs.btrfs", image, content_estimate(ctx)):
            if auto:
                made = make_btrfs_image(image, ctx.layout.root, ctx.tree, size=None)
            else:
                check_tree_fits(ctx)
                made = make_btrfs_image(image, ctx.layout.root, ctx.tree, size=ctx.layout.root.size)
    if auto:
        ctx.layout = resized(ctx.layout, disk_size_for(ctx.layout, made + headroom))
        log.info(
            f"    size auto: a {format_size(made)} btrfs, a {format_size(ctx.layout.size)} disk"
        )
    elif made > ctx.layout.root.size:
        raise too_small(ctx, made)
    return placed


def filled_root(ctx: BuildContext) -> int | None:
    """The btrfs root written by the kernel straight into the disk
    (disk/filesystems.py `kernel_filled`); its size, or None where it could
    not be."""
    root = ctx.layout.root
    if ctx.image.settings.size == AUTO_SIZE:
        used = tree_size(ctx.tree)
        size = fill_size(used)
    else:
        check_tree_fits(ctx)
        used, size = content_estimate(ctx), root.size
    started = time.monotonic()
    with log.watch_growth("btrfs", ctx.disk, used):
        if not kernel_filled(ctx.disk, dataclasses.replace(root, size=size), ctx.tree,
                             offset=root.start, scratch=ctx.workdir):  # fmt: skip
            return None
    log.info(f"    btrfs written by the kernel in {time.monotonic() - started:.1f}s")
    return size


def place_btrfs(ctx: BuildContext, btrfs: Path) -> None:
    """The btrfs into its partition. When the disk is the raw output, its
    SHA-256 is computed on the other core meanwhile, from the pieces."""
    if ctx.disk_file is None:
        place_image(btrfs, ctx.disk, ctx.layout.root)
        return
    digest = in_background(sha256_with_placed, ctx.disk, ctx.layout.root.start, btrfs)
    place_image(btrfs, ctx.disk, ctx.layout.root)
    ctx.output_sha256["raw"] = digest.result()


def assemble_disk(ctx: BuildContext) -> None:
    if ctx.image.target != "disk":
        return
    btrfs = ctx.workdir / "root.btrfs"
    placed = False
    try:
        if ctx.layout.root.filesystem == "btrfs":
            placed = make_btrfs_root(ctx, btrfs)
        else:
            placed = root_from_base(ctx) is not None  # an ext4 from the filesystem cache
            if not placed:
                check_tree_fits(ctx)
        layout = ctx.layout
        write_partition_table(ctx.disk, layout, scratch=ctx.workdir)
        if (esp := layout.partition("esp")) is not None:
            make_esp(ctx.disk, esp, ctx.esp_tree, scratch=ctx.workdir)
        if (bios_boot := layout.bios_boot) is not None:
            install_bios_boot(
                ctx.disk, bios_boot, ctx.bios_dir / "boot.img", ctx.bios_dir / "core.img"
            )
        if layout.root.filesystem == "btrfs":
            if placed and not finish_root_from_base(ctx):
                placed = False
                with log.watch_growth("mkfs.btrfs", btrfs, content_estimate(ctx)):
                    made = make_btrfs_image(btrfs, layout.root, ctx.tree, size=layout.root.size)
                if made > layout.root.size:
                    raise too_small(ctx, made)
            if not placed:
                place_btrfs(ctx, btrfs)
        elif not placed:
            with log.watch_growth("mkfs.ext4", ctx.disk, content_estimate(ctx)):
                make_ext4(ctx.disk, layout.root, ctx.tree)
    finally:
        btrfs.unlink(missing_ok=True)
