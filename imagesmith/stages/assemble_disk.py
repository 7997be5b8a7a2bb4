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

from imagesmith import log
from imagesmith.config.layout import disk_size_for, resized
from imagesmith.config.settings import AUTO_HEADROOM, AUTO_SIZE, format_size
from imagesmith.context import BuildContext
from imagesmith.disk.biosboot import install_bios_boot
from imagesmith.disk.filesystems import make_btrfs, make_esp, make_ext4, tree_size
from imagesmith.disk.gpt import write_partition_table
from imagesmith.errors import ConfigError

# ext4/btrfs metadata and slack on top of the files themselves.
FS_OVERHEAD = 1.15
FS_FIXED_OVERHEAD = 96 * 1024 * 1024


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
        shortfall = need - have
        raise ConfigError(
            f"{ctx.image.config_space / 'imagesmith.toml'} [images.{ctx.image.name}] size: "
            f"the root filesystem needs about {format_size(need)} but the "
            f"{format_size(ctx.image.settings.size)} disk leaves {format_size(have)}",
            hint=f"raise size by at least {format_size(shortfall)}",
        )


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
