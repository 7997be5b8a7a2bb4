"""The build manifest: a JSON record written beside the image.

It holds the image's classes and settings, every installed package with its
version, the partition table, the outputs with sizes and SHA-256 hashes, and
each stage's duration.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from imagesmith import __version__
from imagesmith.context import BuildContext
from imagesmith.outputs import output_path, sha256_file
from imagesmith.verify import secret_digest


def manifest_data(ctx: BuildContext, outputs: dict[str, Path]) -> dict[str, Any]:
    image = ctx.image
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
        "settings": dataclasses.asdict(image.settings),
        "target": image.target,
        "firmware": list(image.settings.boot_firmware) if image.target == "disk" else [],
        "kernel": ctx.kernel_version,
        "skipped_classes": [c.name for c in image.skipped_classes],
        "outputs": {
            fmt: {
                "file": output_path(ctx.output_dir, image.name, fmt).name,
                "size": path.stat().st_size,
                "allocated": path.stat().st_blocks * 512,
                "sha256": ctx.extra.get("sha256", {}).get(fmt) or sha256_file(path),
            }
            for fmt, path in outputs.items()
        },
        "hygiene": {
            "waivers": [
                {"finding": finding, "reason": reason, "class": cls}
                for finding, (reason, cls) in ctx.image.waivers.items()
            ],
            "build_repositories": list(ctx.extra.get("build_repositories", ())),
            "secret_sha256": [secret_digest(s) for s in ctx.extra.get("secrets", ())],
        },
        "caches": {k: ctx.extra[k] for k in ("stage_cache", "initramfs_cache") if k in ctx.extra},
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
    if digest := ctx.extra.get("oci_manifest_digest"):
        data["oci_manifest_digest"] = digest
    return data


def write_manifest(ctx: BuildContext, target: Path, outputs: dict[str, Path]) -> None:
    target.write_text(json.dumps(manifest_data(ctx, outputs), indent=2) + "\n")
