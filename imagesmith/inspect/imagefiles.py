"""Read the root tree out of a built image without booting or mounting it.

- A rootfs tarball is unpacked with tarfile.
- An OCI image archive (IMAGE.oci.tar) is read through its index and
  manifest: its layers are unpacked in order, not the archive itself.
- A zstd-compressed disk (IMAGE.raw.zst) is decompressed to scratch first.
- A disk image (raw or qcow2) is read through its GPT (sfdisk -J): the root
  partition (the discoverable root type, else the largest partition) is
  copied out, holes kept, and its files extracted by the filesystem's own
  offline tools: `debugfs rdump` for ext4, `btrfs restore` for btrfs.
- The ESP's EFI folder comes out with mtools (`mcopy -i DISK@@OFFSET`).

No loop devices, no mounts: this works in the same containers the build does.
A file that is none of these, empty, truncated or damaged is a ConfigError
that names the file the user gave and says what is wrong with it, never a
scratch file's name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from imagesmith.config.layout import ESP_TYPE, ROOT_TYPES, SECTOR
from imagesmith.disk.sparse import copy_sparse_range
from imagesmith.errors import BuildError, ConfigError
from imagesmith.host.run import run

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
KINDS_HINT = "give a .raw, .raw.zst, .qcow2, .oci.tar or .rootfs.tar file that imagesmith built"


def magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


def is_qcow2(path: Path) -> bool:
    return magic(path) == b"QFI\xfb"


def check_image_file(image_file: Path) -> None:
    """Say what is wrong with the path the user gave, before reading it."""
    if image_file.is_dir():
        raise ConfigError(f"{image_file}: is a directory, not an image file", hint=KINDS_HINT)
    if not image_file.exists():
        raise ConfigError(f"{image_file}: no such file", hint=KINDS_HINT)
    if not image_file.is_file():
        raise ConfigError(f"{image_file}: not a regular file", hint=KINDS_HINT)
    if image_file.stat().st_size == 0:
        raise ConfigError(
            f"{image_file}: is empty (0 bytes), not an image",
            hint="was its build or its copy interrupted? build it again",
        )


def damaged(image_file: Path, what: str, error: Exception) -> ConfigError:
    detail = error.message if isinstance(error, BuildError) else str(error)
    last = detail.strip().splitlines()[-1].strip(" |") if detail.strip() else ""
    return ConfigError(
        f"{image_file}: {what}" + (f" ({last})" if last else ""),
        hint="the file is truncated or damaged; copy or build it again",
    )


def partitions_of(disk: Path, image_file: Path) -> list[dict[str, Any]]:
    """The partitions of a GPT disk image; errors name the user's `image_file`."""
    try:
        out = run(["sfdisk", "-J", os.fspath(disk)], capture=True, what="sfdisk -J").stdout
    except BuildError as e:
        raise ConfigError(
            f"{image_file}: no partition table: not a disk image, nor a tar, qcow2 or zstd file",
            hint=KINDS_HINT,
        ) from e
    table = json.loads(out)["partitiontable"]
    partitions: list[dict[str, Any]] = table.get("partitions", [])
    if table.get("label") == "dos" and [p.get("type") for p in partitions] == ["ee"]:
        raise unreadable_gpt(disk, image_file)
    if not partitions:
        raise ConfigError(f"{image_file}: no partitions found")
    return partitions


def esp_offset(disk: Path, image_file: Path) -> int | None:
    """Byte offset of the EFI system partition, None without one."""
    esp = [p for p in partitions_of(disk, image_file) if p.get("type", "").upper() == ESP_TYPE]
    return esp[0]["start"] * SECTOR if esp else None


def root_partition(disk: Path, image_file: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the root partition of a GPT disk image."""
    partitions = partitions_of(disk, image_file)
    root_types = {t.upper() for t in ROOT_TYPES.values()}
    chosen = next(
        (p for p in partitions if p.get("type", "").upper() in root_types),
        max(partitions, key=lambda p: p["size"]),
    )
    offset, size = chosen["start"] * SECTOR, chosen["size"] * SECTOR
    if offset + size > disk.stat().st_size:
        raise ConfigError(
            f"{image_file}: truncated: the disk is {disk.stat().st_size} bytes, but its "
            f"partition table says the root partition ends at byte {offset + size}",
            hint="copy or build it again",
        )
    return offset, size


def unreadable_gpt(disk: Path, image_file: Path) -> ConfigError:
    """sfdisk shows only the protective MBR when the GPT is unreadable; that
    MBR's partition still records the disk's length (start + size, in sectors)."""
    with disk.open("rb") as f:
        entry = f.read(512)[446:462]
    recorded = int.from_bytes(entry[8:12], "little") + int.from_bytes(entry[12:16], "little") + 1
    actual = disk.stat().st_size
    if recorded * SECTOR > actual:
        return ConfigError(
            f"{image_file}: truncated: the disk is {actual} bytes, but its partition table "
            f"says {recorded * SECTOR}",
            hint="copy or build it again",
        )
    return ConfigError(
        f"{image_file}: its GPT cannot be read (a protective MBR only)",
        hint="the file is damaged; copy or build it again",
    )


def extract_filesystem(image: Path, dest: Path, image_file: Path) -> None:
    fstype = (
        run(
            ["blkid", "-p", "-o", "value", "-s", "TYPE", os.fspath(image)],
            capture=True,
            check=False,
        )
        .stdout.decode()
        .strip()
    )
    try:
        if fstype == "ext4":
            run(["debugfs", "-R", f"rdump / {dest}", os.fspath(image)],
                capture=True, what="debugfs rdump")  # fmt: skip
        elif fstype == "btrfs":
            run(["btrfs", "restore", "-m", "-S", "-x", "-i", os.fspath(image), os.fspath(dest)],
                capture=True, what="btrfs restore")  # fmt: skip
    except BuildError as e:
        raise damaged(image_file, f"its {fstype} root filesystem cannot be read", e) from e
    if fstype not in ("ext4", "btrfs"):
        raise ConfigError(
            f"{image_file}: the root partition holds no ext4 or btrfs filesystem "
            f"(found {fstype or 'nothing recognisable'})",
            hint="is the file truncated or damaged? imagesmith reads the disks it builds",
        )


def tar_member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    member = tar.extractfile(name)
    if member is None:
        raise KeyError(f"{name} is not a file in the archive")
    return member


def oci_layers(tar: tarfile.TarFile) -> list[str]:
    """The layer blobs of an OCI image archive, in order; [] for another tar."""
    if not {"oci-layout", "index.json"} <= set(tar.getnames()):
        return []

    def blob(digest: str) -> str:
        return f"blobs/sha256/{digest.removeprefix('sha256:')}"

    index = json.load(tar_member(tar, "index.json"))
    manifest = json.load(tar_member(tar, blob(index["manifests"][0]["digest"])))
    return [blob(layer["digest"]) for layer in manifest["layers"]]


def unpack_tar(image_file: Path, tree: Path) -> None:
    """A rootfs tar, or the layers of an OCI archive, into `tree`; either may be
    hostile, so every member goes through `untrusted_member`."""
    try:
        with tarfile.open(image_file) as tar:
            layers = oci_layers(tar)
            if not layers:
                tar.extractall(tree, filter=untrusted_member)
                return
            for name in layers:
                with tarfile.open(fileobj=tar_member(tar, name), mode="r|*") as layer:
                    layer.extractall(tree, filter=untrusted_member)
    except tarfile.FilterError as e:
        raise ConfigError(
            f"{image_file}: refused: {e}",
            hint="an image tarball must not write outside its own root",
        ) from e
    except (tarfile.TarError, EOFError, OSError, KeyError, ValueError) as e:
        raise damaged(image_file, "the tar archive cannot be read to the end", e) from e


def untrusted_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's `tar` filter (no absolute names, nothing outside `dest`, not
    even through a symlink the archive made, no setuid bits), and no device
    nodes or FIFOs: the scan reads regular files only."""
    if member.isdev() or member.isfifo():
        return None
    return tarfile.tar_filter(member, dest)


def copy_esp_efi(disk: Path, dest: Path, image_file: Path) -> bool:
    """The ESP's /EFI folder into `dest`; False when the disk has no ESP."""
    offset = esp_offset(disk, image_file)
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
    check_image_file(image_file)
    with tempfile.TemporaryDirectory(prefix="imagesmith-verify-") as tmp:
        work = Path(tmp)
        tree = work / "root"
        tree.mkdir()
        if tarfile.is_tarfile(image_file):
            unpack_tar(image_file, tree)
            yield tree
            return
        disk = uncompressed_disk(image_file, work)
        if esp is not None:
            copy_esp_efi(disk, esp, image_file)
        offset, size = root_partition(disk, image_file)
        part = work / "root.img"
        with part.open("wb") as f:
            f.truncate(size)
        copy_sparse_range(disk, part, src_offset=offset, length=size)
        extract_filesystem(part, tree, image_file)
        yield tree


def uncompressed_disk(image_file: Path, work: Path) -> Path:
    """The raw disk of a raw, qcow2 or raw.zst file (the last two into `work`)."""
    disk = work / "disk.raw"
    if is_qcow2(image_file):
        # convert reads a truncated qcow2 without complaint (missing clusters
        # read as zeros); check's exit code 2 means corruption (3: leaks only).
        checked = run(["qemu-img", "check", "-q", os.fspath(image_file)], capture=True, check=False)
        if checked.returncode not in (0, 3):
            error = BuildError(checked.stderr.decode(errors="replace") or "qemu-img check failed")
            raise damaged(image_file, "the qcow2 image is damaged or truncated", error)
        argv = ["qemu-img", "convert", "-O", "raw", os.fspath(image_file), os.fspath(disk)]
        what = "the qcow2 image cannot be read to the end"
    elif magic(image_file) == ZSTD_MAGIC:
        argv = ["zstd", "-d", "-q", "-f", "--sparse", "-o", os.fspath(disk), os.fspath(image_file)]
        what = "cannot be decompressed"
    else:
        return image_file
    try:
        run(argv, capture=True, what=argv[0])
    except BuildError as e:
        raise damaged(image_file, what, e) from e
    return disk
