"""Stage: keep the package stage's tree as a cached btrfs, for assembly to
change instead of making the whole filesystem again (disk/incremental.py).

Needs: `ctx.tree` exactly as the stage cache restored it.
Produces: `ctx.filesystem_base` (the cache entry) and `ctx.tree_mark`.

Runs for btrfs disk images whose package stage came from the stage cache: a
tree mmdebstrap just made is kept in the cache as the tar it restores from,
not byte for byte as it stands, so the cached btrfs is made from a restored
tree only. The first such build makes the entry (as long as a whole
filesystem takes); the ones after copy it. `IMAGESMITH_FILESYSTEM_CACHE=0`
turns this off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from pathlib import Path

from imagesmith import log
from imagesmith.cache import entries
from imagesmith.cache import filesystems as fscache
from imagesmith.cache.entries import CacheUse
from imagesmith.cache.stages import TREE_FILE, UNPACKED_DIR
from imagesmith.cache.stages import entry_dir as stage_entry_dir
from imagesmith.config.settings import AUTO_SIZE, format_size
from imagesmith.context import BuildContext
from imagesmith.disk import incremental
from imagesmith.disk.filesystems import make_btrfs_image, tree_size
from imagesmith.disk.sparse import copy_sparse, sha256_file
from imagesmith.errors import OUT_OF_SPACE, BuildError
from imagesmith.host import overlay
from imagesmith.host.background import in_background

SWITCH = "IMAGESMITH_FILESYSTEM_CACHE"


def prepare_filesystem_base(ctx: BuildContext) -> None:
    if (
        ctx.image.target != "disk"
        or ctx.layout.root.filesystem != "btrfs"
        or not ctx.tree_key
        # A stage made from a parent, extracted: no pristine copy to make it from.
        or (not ctx.tree_overlay and ctx.stage_cache is not None and not ctx.stage_cache.hit)
        or os.environ.get(SWITCH) == "0"
    ):
        return
    label = ctx.layout.root.label
    key = fscache.filesystem_key(ctx.tree_key, label=label, tool=fscache.mkfs_version())
    with fscache.locked(ctx.cache_dir, key):
        entry = fscache.usable_entry(ctx.cache_dir, key)
        ctx.filesystem_cache = CacheUse(key, hit=entry is not None)
        if entry is not None:
            log.info(f"    filesystem cache hit {key}")
        else:
            log.info(f"    filesystem cache miss {key}: making the package stage's btrfs once")
            entry = make_base(ctx, key)
    if entry is None:
        return
    ctx.filesystem_base = entry
    ctx.tree_mark = ctx.tree_mark or incremental.mark(ctx.workdir)
    # Copied into the disk, at the root's offset, while the classes work.
    ctx.base_copy = in_background(copy_base, entry, ctx.disk, ctx.layout.root.start)


def make_base(ctx: BuildContext, key: str) -> Path | None:
    part = dataclasses.replace(ctx.layout.root, fs_uuid=str(uuid.uuid4()))
    final = fscache.entry_dir(ctx.cache_dir, key)
    try:
        with fscache.new_filesystem(ctx.cache_dir, key, {"uuid": part.fs_uuid}) as temp:
            image = temp / fscache.IMAGE_FILE
            # The cached tree itself where it is mounted: a stage made from
            # a parent has changed the build's view of it already.
            pristine = ctx.tree
            if ctx.tree_overlay:
                pristine = stage_entry_dir(ctx.cache_dir, ctx.tree_key) / UNPACKED_DIR
            with log.watch_growth("mkfs.btrfs", image, content_estimate(ctx)):
                make_btrfs_image(image, part, pristine, size=None)
            paths = incremental.tree_state(pristine)
            (temp / fscache.PATHS_FILE).write_bytes(b"\0".join(sorted(paths)))
    except (BuildError, OSError) as e:
        entries.warn_not_saved("the package stage's btrfs", final, reason(e))
        return None
    return final


def reason(error: BuildError | OSError) -> str:
    """What went wrong, in one line for a warning."""
    return error.message.splitlines()[0] if isinstance(error, BuildError) else str(error)


def content_estimate(ctx: BuildContext) -> int:
    """About how many bytes the root filesystem will hold, for progress: the
    package stage's tar when the cache has it (free to ask), else a walk."""
    if ctx.stage_cache is not None:
        tar = stage_entry_dir(ctx.cache_dir, ctx.stage_cache.key) / TREE_FILE
        with contextlib.suppress(OSError):
            return tar.stat().st_size
    return tree_size(ctx.tree)


def btrfs_from_base(ctx: BuildContext) -> int | None:
    """The root btrfs made in the disk, at its offset, from the cached one and
    the build's changes; its size. None when there is no cached one, or it
    could not be used (said in a warning): the caller then makes the whole
    filesystem."""
    entry = ctx.filesystem_base
    if entry is None or ctx.base_copy is None:
        return None
    root = ctx.layout.root
    try:
        # What changed is listed while the copy may still be running.
        found = listed_changes(ctx, fscache.recorded_paths(entry))
        waited = time.monotonic()
        base = ctx.base_copy.result()
        waited = time.monotonic() - waited
        applying = time.monotonic()
        if ctx.image.settings.size == AUTO_SIZE:
            size = base + int(found.changed_bytes * incremental.CHANGE_OVERHEAD) + incremental.SLACK
        elif base > root.size:
            raise BuildError(f"the cached btrfs alone ({format_size(base)}) does not fit")
        else:
            size = root.size
        incremental.apply_changes(
            ctx.disk, root.start, ctx.tree, found, size=size, uuid=root.fs_uuid
        )
    except (BuildError, OSError) as e:
        if isinstance(e, OSError) and e.errno in OUT_OF_SPACE:
            raise
        log.warn(f"the cached btrfs could not be used ({reason(e)}); making the whole filesystem")
        if ctx.filesystem_cache is not None:
            ctx.filesystem_cache = dataclasses.replace(ctx.filesystem_cache, hit=False)
        os.truncate(ctx.disk, root.start)  # nothing of the copy stays in the disk
        return None
    applied = time.monotonic() - applying
    log.info(
        f"    btrfs from the filesystem cache ({waited:.1f}s waiting for its copy, "
        f"{applied:.1f}s applying): {len(found.changed)} paths changed "
        f"({format_size(found.changed_bytes)}), {len(found.removed)} removed"
    )
    return size


def listed_changes(ctx: BuildContext, cached_paths: set[bytes]) -> incremental.Changes:
    """What the build changed in the tree: from the overlay's upper layer
    when the tree is mounted, else (or when that cannot tell) by ctime."""
    if ctx.tree_overlay:
        upper = overlay.upper_layer(ctx.overlay_scratch)
        if (found := incremental.overlay_changes(ctx.tree, upper, cached_paths)) is not None:
            return found
    return incremental.changes(ctx.tree, ctx.tree_mark, cached_paths)


def copy_base(entry: Path, disk: Path, offset: int) -> int:
    """Copy the entry's filesystem into `disk` at `offset`, hashing it on the
    way (a second reader on another core); its size. A mismatch discards the
    entry."""
    source = entry / fscache.IMAGE_FILE
    size = source.stat().st_size
    digest = in_background(sha256_file, source)  # its holes are hashed from memory
    disk.touch()
    copy_sparse(source, disk, offset=offset)
    if problem := entries.digest_problem(entry, {fscache.IMAGE_FILE: digest.result()}):
        entries.discard(entry, problem)
        raise BuildError(f"cache entry {entry}: {problem}")
    return size
