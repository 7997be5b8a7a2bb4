"""Stage: assemble a container image: the root filesystem as one layer.

Needs: `ctx.tree` finalised. Container images only (outputs `oci`, `tar`);
for a disk image this stage returns at once. The classes that only a
bootable system needs (kernel, bootloader, firmware: `base`, `uefi`, `bios`)
were already left out when the image was resolved, so the tree has no
kernel, no initramfs and no GRUB.
Produces: `ctx.rootfs_tar`, an uncompressed tar of the tree (numeric
owners, extended attributes such as file capabilities kept, names sorted,
no device nodes: a container runtime makes its own /dev).

The outputs stage turns that tarball into (formats/oci.py):

- `tar`: the tarball itself, for `podman import`, `docker import`,
  machinectl, or a chroot;
- `oci`: an OCI image archive (what skopeo and podman call `oci-archive:`):
  a tar of an OCI image layout with the gzip-compressed layer, the image
  config and its manifest, tagged `latest`. The config's entrypoint, cmd
  and environment come from the `container_*` settings. Its labels say the
  image name, the classes and the build time, plus `container_labels`.
"""

from __future__ import annotations

import os
from pathlib import Path

from imagesmith.context import BuildContext
from imagesmith.host.run import run


def rootfs_tar_argv(tree: Path, target: Path) -> list[str]:
    return [
        "tar", "--create", f"--file={os.fspath(target)}", f"--directory={os.fspath(tree)}",
        "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name",
        "--format=posix", "--pax-option=delete=atime,delete=ctime",
        "--exclude=./dev/*", ".",
    ]  # fmt: skip


def assemble_container(ctx: BuildContext) -> None:
    if ctx.image.target != "container":
        return
    run(rootfs_tar_argv(ctx.tree, ctx.rootfs_tar), what="tar (container root filesystem)")
