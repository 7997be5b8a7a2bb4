"""Stage: outputs. Write each requested format, then the manifest.

Needs: `ctx.disk` (disk images) or `ctx.rootfs_tar` (container images).
Produces, in the output directory, as the image's `outputs` ask:

raw, raw.zst, qcow2, oci and tar (see formats/__init__.py for the file
names), and always `IMAGE.manifest.json`: the image's classes and settings,
every installed package with its version, the partition table, the outputs
with sizes and SHA-256 hashes, and each stage's duration.

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
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesmith import __version__, log
from imagesmith.cache.keys import hygiene_key
from imagesmith.config.settings import redacted
from imagesmith.config.space import ResolvedImage
from imagesmith.context import BuildContext
from imagesmith.disk.sparse import sha256_file
from imagesmith.formats import OUTPUT_TEMP_PREFIX, output_path
from imagesmith.formats.oci import write_oci_archive
from imagesmith.host.run import run
from imagesmith.inspect.verify import key_id, secret_digest

ZSTD_LEVEL = 3
# hashlib releases the GIL: the raw disk's hash (the longest, 2 GiB of mostly
# zeros for the example) runs beside the next output's writing and hashing.
HASH_THREADS = 2


@dataclass
class StagedOutputs:
    """Outputs being written: each in a private directory of the output
    directory, made by mkdtemp (mode 0700, an unpredictable name), so
    another user of a shared output directory cannot plant a symlink where
    root writes a disk."""

    directory: Path
    files: dict[str, Path] = field(default_factory=dict)  # format -> temp file

    def add(self, output_dir: Path, image: str, fmt: str) -> Path:
        self.files[fmt] = self.directory / output_path(output_dir, image, fmt).name
        return self.files[fmt]


@contextlib.contextmanager
def staged_outputs(ctx: BuildContext) -> Iterator[StagedOutputs]:
    """Yield the staging area; rename every file into place on success."""
    prefix = f"{OUTPUT_TEMP_PREFIX}{os.getpid()}-"
    staged = StagedOutputs(Path(tempfile.mkdtemp(prefix=prefix, dir=ctx.output_dir)))
    try:
        yield staged
        for fmt, temp in staged.files.items():
            os.replace(temp, output_path(ctx.output_dir, ctx.image.name, fmt))
    finally:
        shutil.rmtree(staged.directory, ignore_errors=True)


def write_raw(ctx: BuildContext, target: Path) -> None:
    """Nothing to write: build.py assembles the disk in the raw output's temp file."""
    if target != ctx.disk:
        raise AssertionError(f"the disk {ctx.disk} is not the raw output {target}")


def write_qcow2(ctx: BuildContext, target: Path) -> None:
    with log.watch_growth("qcow2", target, os.stat(ctx.disk).st_blocks * 512):
        convert_qcow2(ctx, target)


def convert_qcow2(ctx: BuildContext, target: Path) -> None:
    run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(ctx.disk), os.fspath(target)],
        what="qemu-img convert",
    )


def write_raw_zst(ctx: BuildContext, target: Path) -> None:
    run(
        ["zstd", "-q", f"-{ZSTD_LEVEL}", "-T0", "-o", os.fspath(target), os.fspath(ctx.disk)],
        what="zstd (raw.zst)",
    )


def write_oci(ctx: BuildContext, target: Path) -> None:
    ctx.oci_manifest_digest = write_oci_archive(
        ctx.image, ctx.rootfs_tar, target, scratch=ctx.workdir
    )


def write_rootfs_tar(ctx: BuildContext, target: Path) -> None:
    shutil.copyfile(ctx.rootfs_tar, target)


WRITERS: dict[str, Callable[[BuildContext, Path], None]] = {
    "raw": write_raw,
    "raw.zst": write_raw_zst,
    "qcow2": write_qcow2,
    "oci": write_oci,
    "tar": write_rootfs_tar,
}


def write_outputs(ctx: BuildContext, staged: StagedOutputs) -> None:
    """Write every requested format; their hashes land in ctx.output_sha256."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, Future[str]] = {}
    with ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="sha256") as hasher:
        for fmt in ctx.image.settings.outputs:
            temp = staged.files.get(fmt) or staged.add(ctx.output_dir, ctx.image.name, fmt)
            if fmt == "raw" and fmt not in ctx.output_sha256:  # else hashed as it was placed
                hashes[fmt] = hasher.submit(sha256_file, ctx.disk)
            WRITERS[fmt](ctx, temp)
            if fmt != "raw":
                hashes[fmt] = hasher.submit(sha256_file, temp)
            ctx.outputs[fmt] = temp
        ctx.output_sha256.update({fmt: future.result() for fmt, future in hashes.items()})


def redacted_settings(image: ResolvedImage) -> dict[str, Any]:
    return {
        name: redacted(name, value) for name, value in dataclasses.asdict(image.settings).items()
    }


def manifest_data(ctx: BuildContext, outputs: dict[str, Path]) -> dict[str, Any]:
    image = ctx.image
    key = hygiene_key(ctx.cache_dir)
    data: dict[str, Any] = {
        "imagesmith_version": __version__,
        "image": image.name,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_space": str(image.config_space),
        "classes": [
            {
                "name": c.name,
                "builtin": c.builtin,
                "path": str(c.path),
                "switched_by": c.switched_by,
            }
            for c in image.classes
        ],
        "settings": redacted_settings(image),
        "target": image.target,
        "firmware": list(image.settings.boot_firmware) if image.target == "disk" else [],
        "kernel": ctx.kernel_version,
        "skipped_classes": [c.name for c in image.skipped_classes],
        "outputs": {
            fmt: {
                "file": output_path(ctx.output_dir, image.name, fmt).name,
                "size": path.stat().st_size,
                "allocated": path.stat().st_blocks * 512,
                "sha256": ctx.output_sha256.get(fmt) or sha256_file(path),
            }
            for fmt, path in outputs.items()
        },
        "hygiene": {
            "waivers": [
                {"finding": finding, "reason": reason, "class": cls}
                for finding, (reason, cls) in ctx.image.waivers.items()
            ],
            "build_repositories": list(ctx.build_repositories),
            "secret_key_id": key_id(key),
            "secret_hmac_sha256": [secret_digest(s, key) for s in ctx.secrets],
        },
        "caches": {
            name: {k: v for k, v in dataclasses.asdict(use).items() if k != "remote" or v}
            for name, use in (
                ("stage_cache", ctx.stage_cache),
                ("initramfs_cache", ctx.initramfs_cache),
                ("filesystem_cache", ctx.filesystem_cache),
            )
            if use is not None
        },
        "packages": ctx.packages,
        "timings": ctx.timings,
    }
    if image.target == "disk":
        data["disk"] = {
            "size": ctx.layout.size,
            "label": "gpt",
            "disk_uuid": ctx.layout.disk_uuid,
            "partitions": [dataclasses.asdict(p) for p in ctx.layout.partitions],
        }
    if ctx.oci_manifest_digest:
        data["oci_manifest_digest"] = ctx.oci_manifest_digest
    return data


def write_manifest(ctx: BuildContext, target: Path, outputs: dict[str, Path]) -> None:
    target.write_text(json.dumps(manifest_data(ctx, outputs), indent=2) + "\n")
