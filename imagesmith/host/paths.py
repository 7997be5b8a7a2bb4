"""Paths inside an image tree that never lead out of it.

An image tree is full of symlinks that maintainer scripts and class files
made: absolute ones (`/lib -> usr/lib`) mean the image's root, not the build
host's. `resolve_in_root()` follows them the way a chroot would, so code on
the host can read a file of the tree without being led onto the host.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_in_root(root: Path, path: str) -> Path | None:
    """`path` inside `root` with the root's own symlinks followed as a chroot would."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    result = root.joinpath(*resolved)
    return result if result.exists() else None
