"""Read the root tree out of a built image without booting or mounting it.

- A rootfs tarball is unpacked with tarfile.
- A disk image (raw or qcow2) is read through its GPT (sfdisk -J): the root
  partition (the discoverable root type, else the largest partition) is
  copied out, holes kept, and its files extracted by the filesystem's own
  offline tools: `debugfs rdump` for ext4, `btrfs restore` for btrfs.

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

from imagesmith.config.layout import ROOT_TYPES, SECTOR
from imagesmith.disk.sparse import copy_sparse_range
from imagesmith.errors import ConfigError
from imagesmith.host.run import run


def is_qcow2(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"QFI\xfb"


def root_partition(disk: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the root partition of a GPT disk image."""
    out = run(["sfdisk", "-J", os.fspath(disk)], capture=True, what="sfdisk -J").stdout
    partitions = json.loads(out)["partitiontable"].get("partitions", [])
    if not partitions:
        raise ConfigError(f"{disk}: no partitions found")
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


def untrusted_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's `tar` filter (no absolute names, nothing outside `dest`, not
    even through a symlink the archive made, no setuid bits), and no device
    nodes or FIFOs: the scan reads regular files only."""
    if member.isdev() or member.isfifo():
        return None
    return tarfile.tar_filter(member, dest)


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack an image's tarball, which may be hostile, into `dest`."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter=untrusted_member)
    except tarfile.FilterError as e:
        raise ConfigError(
            f"{archive}: refused: {e}",
            hint="an image tarball must not write outside its own root",
        ) from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ConfigError(f"{archive}: not a readable tar archive: {e}") from e


@contextlib.contextmanager
def image_tree(image_file: Path) -> Iterator[Path]:
    """Yield a temporary directory holding the image's root tree."""
    if not image_file.is_file():
        raise ConfigError(f"{image_file}: no such file")
    with tempfile.TemporaryDirectory(prefix="imagesmith-verify-") as tmp:
        work = Path(tmp)
        tree = work / "root"
        tree.mkdir()
        if tarfile.is_tarfile(image_file):
            extract_tar(image_file, tree)
            yield tree
            return
        disk = image_file
        if is_qcow2(image_file):
            disk = work / "disk.raw"
            run(
                ["qemu-img", "convert", "-O", "raw", os.fspath(image_file), os.fspath(disk)],
                what="qemu-img convert",
            )
        offset, size = root_partition(disk)
        part = work / "root.img"
        with part.open("wb") as f:
            f.truncate(size)
        copy_sparse_range(disk, part, src_offset=offset, length=size)
        extract_filesystem(part, tree)
        yield tree
