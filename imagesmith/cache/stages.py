"""The stage cache: finished package-stage trees, reused across builds.

The bootstrap-and-packages stage (one mmdebstrap run) is the slow part of a
build, and its result depends on few inputs. Those inputs are hashed into a
key (`stage_key()`):

- suite, architecture, components and the mirror;
- every class repository (URI, suites, components), with the content of each
  `signed_by` key file, and the content of every local .deb;
- the index state: the InRelease (or Release) file of each repository and
  suite, fetched once per build, so the archive publishing new versions
  changes the key;
- the merged package set (order does not matter to apt, so it is sorted) and
  the debconf selections;
- the tool version: imagesmith's bootstrap code and the mmdebstrap script.

Everything later (files, scripts, users, removals, boot and disk settings)
is applied to a copy of the cached tree, so changing it reuses the entry.

An entry is `stages/KEY/` in the cache directory holding `root.tar` (the
tree, with owners, modes, xattrs, ACLs, hard links and device nodes) and
`entry.json` (what went into the key, for `imagesmith cache` and for
debugging a miss). It is written under a temporary name and renamed into
place, so an interrupted build never leaves a half entry visible. A lock per
key makes parallel builds with the same key wait for one mmdebstrap run and
share its result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagesmith.cache import entries
from imagesmith.config.classes import class_layers
from imagesmith.config.space import ResolvedImage
from imagesmith.host.run import run

STAGES_DIR = "stages"
ENTRY_FILE = "entry.json"
TREE_FILE = "root.tar"
# The tree's .debs live in the .deb cache already, and apt rebuilds its own
# binary caches: neither belongs in an entry.
TAR_EXCLUDES = ("./var/cache/apt/archives/*.deb", "./var/cache/apt/*.bin")
TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_key_inputs(
    image: ResolvedImage, *, mirror: str, index_state: Mapping[str, str], tool_version: str
) -> dict[str, Any]:
    """Everything that can change the package stage's tree, as plain data."""
    s = image.settings
    return {
        "stage": "bootstrap and packages",
        "tool": tool_version,
        "suite": s.suite,
        "architecture": s.architecture,
        "components": list(s.components),
        "mirror": mirror,
        "repositories": [
            [r.name, r.uri, list(r.suites), list(r.components), r.signed_by]
            for r in image.repositories
        ],
        "keys": {
            r.signed_by: file_sha256(Path(r.signed_by)) for r in image.repositories if r.signed_by
        },
        "local_debs": sorted(
            file_sha256(deb) for layer in class_layers(image.classes) for deb in layer.debs
        ),
        "index": dict(sorted(index_state.items())),
        "packages": sorted(image.packages),
        "recommends": sorted(image.recommends),
        "debconf": image.debconf,
    }


def stage_key(inputs: Mapping[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def stages_dir(cache_dir: Path) -> Path:
    return cache_dir / STAGES_DIR


def entry_dir(cache_dir: Path, key: str) -> Path:
    return stages_dir(cache_dir) / key


def locked(cache_dir: Path, key: str) -> contextlib.AbstractContextManager[None]:
    """Hold the key's lock: one build per key runs mmdebstrap, the rest wait and reuse."""
    return entries.locked(stages_dir(cache_dir), key)


def has_entry(cache_dir: Path, key: str) -> bool:
    return (entry_dir(cache_dir, key) / TREE_FILE).is_file()


def restore_tree(cache_dir: Path, key: str, tree: Path) -> bool:
    """Extract the entry's tree into `tree` (which must not exist); False on a miss."""
    entry = entry_dir(cache_dir, key)
    if not has_entry(cache_dir, key):
        return False
    tree.mkdir(mode=0o755)
    run(["tar", "-x", *TAR_OPTIONS, "-f", os.fspath(entry / TREE_FILE), "-C", os.fspath(tree)],
        what="restoring the cached package stage")  # fmt: skip
    os.utime(entry)  # last used, for pruning
    return True


def save_tree(cache_dir: Path, key: str, tree: Path, info: Mapping[str, Any]) -> Path:
    """Store `tree` as the entry for `key`, atomically; returns the entry."""
    final = entry_dir(cache_dir, key)
    with entries.new_entry(final) as temp:
        run(
            ["tar", "-c", *TAR_OPTIONS, *(f"--exclude={x}" for x in TAR_EXCLUDES),
             "-f", os.fspath(temp / TREE_FILE), "-C", os.fspath(tree), "."],
            what="saving the package stage to the cache",
        )  # fmt: skip
        record = {"key": key, "created": time.time(), **info}
        (temp / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return final
