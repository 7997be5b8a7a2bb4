"""Read the root tree out of a built image without booting or mounting it.

- A rootfs tarball is unpacked with tarfile.
- A disk image (raw or qcow2) is read through its GPT (sfdisk -J): the root
  partition (the discoverable root type, else the largest partition) is
  copied out, holes kept, and its files extracted by the filesystem's own
  offline tools: `debugfs rdump` for ext4, `btrfs restore` for btrfs.
- The ESP's EFI folder comes out with mtools (`mcopy -i DISK@@OFFSET`).

No loop devices, no mounts: this works in the same containers the build does.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagesmith.config.layout import ESP_TYPE, ROOT_TYPES, SECTOR
from imagesmith.disk.sparse import copy_sparse_range
from imagesmith.errors import ConfigError
from imagesmith.host.run import run


def is_qcow2(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"QFI\xfb"


def partitions_of(disk: Path) -> list[dict[str, Any]]:
    out = run(["sfdisk", "-J", os.fspath(disk)], capture=True, what="sfdisk -J").stdout
    partitions: list[dict[str, Any]] = json.loads(out)["partitiontable"].get("partitions", [])
    if not partitions:
        raise ConfigError(f"{disk}: no partitions found")
    return partitions


def esp_offset(disk: Path) -> int | None:
    """Byte offset of the EFI system partition, None without one."""
    esp = [p for p in partitions_of(disk) if p.get("type", "").upper() == ESP_TYPE]
    return esp[0]["start"] * SECTOR if esp else None


def root_partition(disk: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the root partition of a GPT disk image."""
    partitions = partitions_of(disk)
    root_types = {t.upper() for t in ROOT_TYPES.values()}
    chosen = next(
        (p for p in partitions if p.get("type", "").upper() in root_types),
        max(partitions, key=lambda p: p["size"]),
    )
    return chosen["start"] * SECTOR, chosen["size"] * SECTOR


def extract_filesystem(image: Path, dest: Path) -> None:
    fstype = (
        run(
            ["blkid", "-p", "-o", "value", "-s", "TYPE", os.fspath(image)],
            capture=True,
            check=False,
        )
        .stdout.decode()
        .strip()
    )
    if fstype == "ext4":
        run(
            ["debugfs", "-R", f"rdump / {dest}", os.fspath(image)],
            capture=True,
            what="debugfs rdump",
        )
    elif fstype == "btrfs":
        run(
            ["btrfs", "restore", "-m", "-S", "-x", "-i", os.fspath(image), os.fspath(dest)],
            capture=True,
            what="btrfs restore",
        )
    else:
        raise ConfigError(f"{image}: root filesystem type {fstype or 'unknown'!r} is not supported")


@contextlib.contextmanager
def raw_disk(image_file: Path) -> Iterator[Path]:
    """The image as a raw disk file: itself, or a raw copy of a qcow2."""
    if not is_qcow2(image_file):
        yield image_file
        return
    with tempfile.TemporaryDirectory(prefix="imagesmith-raw-") as tmp:
        disk = Path(tmp) / "disk.raw"
        run(
            ["qemu-img", "convert", "-O", "raw", os.fspath(image_file), os.fspath(disk)],
            what="qemu-img convert",
        )
        yield disk


def copy_esp_efi(disk: Path, dest: Path) -> bool:
    """The ESP's /EFI folder into `dest`; False when the disk has no ESP."""
    offset = esp_offset(disk)
    if offset is None:
        return False
    run(
        ["mcopy", "-s", "-n", "-i", f"{os.fspath(disk)}@@{offset}", "::/EFI", os.fspath(dest)],
        capture=True,
        what="mcopy (the ESP's EFI folder)",
    )
    return True


@contextlib.contextmanager
def image_tree(image_file: Path, *, esp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory holding the image's root tree.

    With `esp`, a disk image's ESP /EFI folder is copied there too.
    """
    if not image_file.is_file():
        raise ConfigError(f"{image_file}: no such file")
    with tempfile.TemporaryDirectory(prefix="imagesmith-verify-") as tmp:
        work = Path(tmp)
        tree = work / "root"
        tree.mkdir()
        if tarfile.is_tarfile(image_file):
            with tarfile.open(image_file) as tar:
                tar.extractall(tree, filter="fully_trusted")
            yield tree
            return
        with raw_disk(image_file) as disk:
            if esp is not None:
                copy_esp_efi(disk, esp)
            offset, size = root_partition(disk)
            part = work / "root.img"
            with part.open("wb") as f:
                f.truncate(size)
            copy_sparse_range(disk, part, src_offset=offset, length=size)
        extract_filesystem(part, tree)
        yield tree
