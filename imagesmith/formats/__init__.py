"""Output formats: what each is called on disk, and how a file finds its manifest.

| format    | file                | what                                          |
| --------- | ------------------- | --------------------------------------------- |
| `raw`     | IMAGE.raw           | the disk, sparse                              |
| `raw.zst` | IMAGE.raw.zst       | the disk, zstd-compressed (`zstd -d` it)      |
| `qcow2`   | IMAGE.qcow2         | the disk for QEMU and libvirt                 |
| `oci`     | IMAGE.oci.tar       | an OCI image archive (`oci-archive:`, oci.py) |
| `tar`     | IMAGE.rootfs.tar    | the container root filesystem                 |

and always `IMAGE.manifest.json`. The outputs stage (stages/outputs.py)
writes them.
"""

from __future__ import annotations

import re
from pathlib import Path

SUFFIXES = {"manifest": "manifest.json", "oci": "oci.tar", "tar": "rootfs.tar"}
# Every file name an output can have, longest first so "rootfs.tar" wins over "tar".
OUTPUT_SUFFIXES = sorted(
    {"raw", "raw.zst", "qcow2", *SUFFIXES.values()} - {"manifest.json"}, key=len, reverse=True
)
# Outputs are written in a private directory OUTPUT/.imagesmith-tmp-PID-RANDOM
# and renamed into place when all of them are complete.
OUTPUT_TEMP_PREFIX = ".imagesmith-tmp-"
# An output being written, and the PID of the build writing it (host/leftovers.py).
OUTPUT_TEMP_RE = re.compile(r"^\.imagesmith-tmp-(\d+)-")


def output_path(output_dir: Path, image: str, fmt: str) -> Path:
    return output_dir / f"{image}.{SUFFIXES.get(fmt, fmt)}"


def manifest_for(image_file: Path) -> Path:
    """out/server.raw (.raw.zst, .qcow2, .oci.tar, .rootfs.tar) -> out/server.manifest.json"""
    name = image_file.name
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(f".{suffix}"):
            return image_file.with_name(name.removesuffix(f".{suffix}") + ".manifest.json")
    return image_file.with_name(image_file.stem + ".manifest.json")
