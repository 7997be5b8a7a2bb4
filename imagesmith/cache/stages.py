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
- the merged package set (order does not matter to apt, so it is sorted),
  which of its packages come with their Recommends, and
  the debconf selections;
- the tool version: imagesmith's bootstrap code and the mmdebstrap script.

Everything later (files, scripts, users, removals, boot and disk settings)
is applied to a copy of the cached tree, so changing it reuses the entry.

An entry is `stages/KEY/` in the cache directory holding `root.tar` (the
tree, with owners, modes, xattrs, ACLs, hard links and device nodes),
`digest.json` (its size and SHA-256) and `entry.json` (what went into the
key, for `imagesmith cache` and for debugging a miss). It is written under a
temporary name and renamed into place, so an interrupted build never leaves a
half entry visible. A lock per key makes parallel builds with the same key
wait for one mmdebstrap run and share its result.

Before an entry is used, `root.tar` is checked against its digest (about a
second for a server tree). An entry that fails the check, or that tar cannot
extract, is reported, discarded, and the stage runs mmdebstrap again. Saving
is an optimisation: when it fails (a full disk), the build warns and goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from imagesmith.cache import entries
from imagesmith.config.classes import class_layers
from imagesmith.config.space import ResolvedImage
from imagesmith.errors import BuildError
from imagesmith.host.run import run

STAGES_DIR = "stages"
ENTRY_FILE = "entry.json"
TREE_FILE = "root.tar"
# The tar unpacked once, for builds to mount as their tree (host/overlay.py).
UNPACKED_DIR = "tree"
# Part of the key: entries of an older layout (1: no digest.json) are not looked at.
ENTRY_FORMAT = 2
# The tree's .debs live in the .deb cache already, and apt rebuilds its own
# binary caches: neither belongs in an entry.
TAR_EXCLUDES = ("./var/cache/apt/archives/*.deb", "./var/cache/apt/*.bin")
# Key inputs a stage made from a parent stage may differ in (stages/derived.py).
DERIVABLE = ("packages", "recommends")
MAX_ADDED = 8
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
        "format": ENTRY_FORMAT,
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


def parent_entry(cache_dir: Path, inputs: Mapping[str, Any]) -> tuple[str, list[str]] | None:
    """A cached stage this one can be made from by installing a few more
    packages: every key input the same but the package set, which holds all
    of the parent's and at most `MAX_ADDED` more, none of them with its
    Recommends. The parent closest to this set, and the packages to add;
    None when there is none. (A bigger addition, such as a desktop on a
    server's stage, runs mmdebstrap: apt might choose alternatives otherwise
    than for the whole set at once.)"""
    wanted, recommends = set(inputs["packages"]), set(inputs["recommends"])
    best: tuple[str, list[str]] | None = None
    for entry in stages_dir(cache_dir).glob("[0-9a-f]*"):
        try:
            theirs = json.loads((entry / ENTRY_FILE).read_text())["inputs"]
            packages = set(theirs["packages"])
            same = all(theirs.get(k) == v for k, v in inputs.items() if k not in DERIVABLE)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not (
            same
            and packages < wanted
            and len(wanted - packages) <= MAX_ADDED
            and set(theirs["recommends"]) == recommends
            and has_entry(cache_dir, entry.name)
        ):
            continue
        if best is None or len(wanted - packages) < len(best[1]):
            best = (entry.name, sorted(wanted - packages))
    return best


def restore_tree(cache_dir: Path, key: str, tree: Path) -> bool:
    """Extract the entry's tree into `tree` (which must not exist); False on a
    miss, or when the entry is damaged (then it is discarded, with a warning).

    The tree's SHA-256 is computed while tar extracts it (two readers of one
    file, on two cores), not before: a 4 GiB desktop tree costs the time of
    the slower of the two, not their sum. A mismatch removes what was
    extracted."""
    entry = entry_dir(cache_dir, key)
    if not entry.is_dir():
        return False
    problem = entries.digest_problem(entry, known={})  # sizes first: a truncated tar
    if not problem:
        tree.mkdir(mode=0o755)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
            tree_sha256 = hasher.submit(entries.file_sha256, entry / TREE_FILE)
            try:
                run(["tar", "-x", *TAR_OPTIONS, "-f", os.fspath(entry / TREE_FILE),
                     "-C", os.fspath(tree)], what="restoring the cached package stage")  # fmt: skip
            except BuildError as e:
                problem = f"{TREE_FILE} does not extract: {tar_reason(e)}"
            # A damaged file says so, rather than what tar made of it.
            problem = entries.digest_problem(entry, {TREE_FILE: tree_sha256.result()}) or problem
        if problem:
            shutil.rmtree(tree, ignore_errors=True)
    if problem:
        entries.discard(entry, problem)
        return False
    os.utime(entry)  # last used, for pruning
    return True


def unpacked_tree(cache_dir: Path, key: str) -> Path | None:
    """The entry's tree unpacked in the entry (`tree/`), made on first use;
    None on a miss, or when the entry is damaged (then it is discarded, with a
    warning). The caller holds the key's lock.

    The unpacked tree is made under a temporary name from the tar, checked
    against its digest as it is read, synced, and renamed into place: it is
    there whole or not at all. Builds only ever read it (it is the lower
    layer of their overlay), and `in_use()` keeps `cache prune` off it."""
    entry = entry_dir(cache_dir, key)
    unpacked = entry / UNPACKED_DIR
    if unpacked.is_dir():
        os.utime(entry)
        return unpacked
    if not entry.is_dir():
        return None
    for leftover in entries.leftovers(entry):  # an unpacking that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    temp = entry / f"{entries.TEMP_PREFIX}{UNPACKED_DIR}-{os.getpid()}"
    if not restore_tree(cache_dir, key, temp):
        return None
    try:
        entries.sync_filesystem(temp)
        os.rename(temp, unpacked)
    except OSError as e:
        shutil.rmtree(temp, ignore_errors=True)
        entries.warn_not_saved("the unpacked package stage", unpacked, str(e))
        return None
    return unpacked


def in_use(cache_dir: Path, key: str) -> contextlib.AbstractContextManager[None]:
    """Keep the entry while the block runs: builds share it, `cache prune`
    leaves it alone."""
    return entries.in_use(stages_dir(cache_dir), key)


def scan_memo(cache_dir: Path, key: str, scan_key: str) -> Path:
    """Where the hygiene scan keeps what it found in the entry's unpacked
    tree, for one scan context (`scan_key`, which never shows a secret)."""
    return entry_dir(cache_dir, key) / f"scan-{scan_key}.json"


def save_tree(cache_dir: Path, key: str, tree: Path, info: Mapping[str, Any]) -> Path | None:
    """Store `tree` as the entry for `key`, atomically; returns the entry, or
    None (with a warning) when it could not be saved: the build goes on."""
    final = entry_dir(cache_dir, key)
    try:
        with entries.new_entry(final) as temp:
            run(
                ["tar", "-c", *TAR_OPTIONS, *(f"--exclude={x}" for x in TAR_EXCLUDES),
                 "-f", os.fspath(temp / TREE_FILE), "-C", os.fspath(tree), "."],
                what="saving the package stage to the cache",
            )  # fmt: skip
            entries.write_digests(temp, [TREE_FILE])
            record = {"key": key, "created": time.time(), **info}
            (temp / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    except (BuildError, OSError) as e:
        reason = tar_reason(e) if isinstance(e, BuildError) else str(e)
        entries.warn_not_saved("the package stage", final, reason)
        return None
    return final


def tar_reason(error: BuildError) -> str:
    """tar's first specific complaint from a failed run, not its "exiting now"."""
    said = [line.strip(" |") for line in error.message.splitlines() if line.startswith("  | ")]
    generic = ("Exiting with failure status", "Error is not recoverable")
    specific = [line for line in said if not any(g in line for g in generic)]
    return (specific or said or [error.message])[0]
