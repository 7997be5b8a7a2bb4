"""Stage: outputs. Write each requested format, then the manifest.

Needs: `ctx.disk` (disk images) or `ctx.rootfs_tar` (container images).
Produces, in the output directory, as the image's `outputs` ask:

| format    | file                | what                                          |
| --------- | ------------------- | --------------------------------------------- |
| `raw`     | IMAGE.raw           | the disk, sparse                              |
| `raw.zst` | IMAGE.raw.zst       | the disk, zstd-compressed (`zstd -d` it)      |
| `qcow2`   | IMAGE.qcow2         | the disk for QEMU and libvirt                 |
| `oci`     | IMAGE.oci.tar       | an OCI image archive (`oci-archive:`)         |
| `tar`     | IMAGE.rootfs.tar    | the container root filesystem                 |

and always `IMAGE.manifest.json`.

Every file is written under a temporary name in the output directory and
renamed into place only when all of them are complete, so a failed or
interrupted build never leaves a half-written output and never destroys an
earlier good image.

A disk image with a raw output is assembled straight into the raw
output's temp file (build.py stages it before the stages run), so writing
`raw` costs nothing; the other formats are converted from it.

The SHA-256 of each output (for the manifest) is computed in other threads
while the next output is written: on a 2-core machine hashing a 2 GiB raw
image otherwise costs as much as writing all outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from imagesmith.container import write_oci_archive, write_rootfs_tar
from imagesmith.context import BuildContext
from imagesmith.run import run

TEMP_PREFIX = ".imagesmith-tmp-"
SUFFIXES = {"manifest": "manifest.json", "oci": "oci.tar", "tar": "rootfs.tar"}
ZSTD_LEVEL = 3
# hashlib releases the GIL: the raw disk's hash (the longest, 2 GiB of mostly
# zeros for the example) runs beside the next output's writing and hashing.
HASH_THREADS = 2
HASH_CHUNK = 4 * 1024 * 1024
ZEROS = memoryview(bytes(HASH_CHUNK))


def sha256_file(path: Path) -> str:
    """The file's SHA-256. Holes are hashed from memory, never read: reading
    a 2 GiB sparse disk's holes through a disk filesystem's page cache costs
    three times the hashing itself."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here to the end
                data = size
            while position < data:
                n = min(HASH_CHUNK, data - position)
                digest.update(ZEROS[:n])
                position += n
            if position >= size:
                break
            hole = os.lseek(fd, position, os.SEEK_HOLE)
            while position < hole:
                chunk = os.pread(fd, min(HASH_CHUNK, hole - position), position)
                if not chunk:
                    raise OSError(f"{path}: short read at offset {position}")
                digest.update(chunk)
                position += len(chunk)
    return digest.hexdigest()


def output_path(output_dir: Path, image: str, fmt: str) -> Path:
    return output_dir / f"{image}.{SUFFIXES.get(fmt, fmt)}"


def temp_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{final.name}")


@contextlib.contextmanager
def staged_outputs(ctx: BuildContext) -> Iterator[dict[str, Path]]:
    """Yield {format: temp path}; rename all into place on success, else delete."""
    staged: dict[str, Path] = {}
    try:
        yield staged
    except BaseException:
        for temp in staged.values():
            temp.unlink(missing_ok=True)
        raise
    for fmt, temp in staged.items():
        os.replace(temp, output_path(ctx.output_dir, ctx.image.name, fmt))


def write_raw(ctx: BuildContext, target: Path) -> None:
    """Nothing to write: build.py assembles the disk in the raw output's temp file."""
    if target != ctx.disk:
        raise AssertionError(f"the disk {ctx.disk} is not the raw output {target}")


def write_qcow2(ctx: BuildContext, target: Path) -> None:
    run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(ctx.disk), os.fspath(target)],
        what="qemu-img convert",
    )


def write_raw_zst(ctx: BuildContext, target: Path) -> None:
    run(
        ["zstd", "-q", f"-{ZSTD_LEVEL}", "-T0", "-o", os.fspath(target), os.fspath(ctx.disk)],
        what="zstd (raw.zst)",
    )


WRITERS: dict[str, Callable[[BuildContext, Path], None]] = {
    "raw": write_raw,
    "raw.zst": write_raw_zst,
    "qcow2": write_qcow2,
    "oci": write_oci_archive,
    "tar": write_rootfs_tar,
}


def write_outputs(ctx: BuildContext, staged: dict[str, Path]) -> None:
    """Write every requested format; their hashes land in ctx.extra["sha256"]."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, Future[str]] = {}
    with ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="sha256") as hasher:
        for fmt in ctx.image.settings.outputs:
            temp = temp_path(output_path(ctx.output_dir, ctx.image.name, fmt))
            staged[fmt] = temp
            if fmt == "raw":
                hashes[fmt] = hasher.submit(sha256_file, ctx.disk)
            WRITERS[fmt](ctx, temp)
            if fmt != "raw":
                hashes[fmt] = hasher.submit(sha256_file, temp)
            ctx.outputs[fmt] = temp
        ctx.extra["sha256"] = {fmt: future.result() for fmt, future in hashes.items()}
