"""Stage: keep the package stage's tree as a cached btrfs or ext4, for
assembly to change instead of making the whole filesystem again
(disk/incremental.py).

Needs: `ctx.pristine_tree` and `ctx.pristine_key` (stages/cached_tree.py):
the package stage's tree as the stage cache keeps it.
Produces: `ctx.filesystem_base` (the cache entry), `ctx.base_made` (the
entry, once made), `ctx.tree_mark`, and the copies under way
(`ctx.base_copy`, `ctx.base_metadata`).

Runs for disk images (an ext4 one of a fixed size). The first build of a
package stage makes the entry: in the background when the pristine tree is
the read-only lower layer of the build's (mounted after a stage cache miss
or hit), else before the classes change it. The builds after copy it.
`IMAGESMITH_FILESYSTEM_CACHE=0` turns this off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from imagesmith import log
from imagesmith.cache import entries
from imagesmith.cache import filesystems as fscache
from imagesmith.cache.entries import CacheUse
from imagesmith.cache.stages import TREE_FILE
from imagesmith.cache.stages import entry_dir as stage_entry_dir
from imagesmith.config.layout import Partition
from imagesmith.config.settings import AUTO_SIZE, format_size
from imagesmith.context import BuildContext
from imagesmith.disk import incremental
from imagesmith.disk.filesystems import (
    fill_size,
    kernel_filled,
    make_btrfs_image,
    make_ext4,
    tree_size,
)
from imagesmith.disk.sparse import (
    copy_sparse,
    copy_sparse_apart,
    punch_hole,
    sha256_file,
    sha256_with_overlay,
)
from imagesmith.errors import BuildError, is_out_of_space
from imagesmith.host import overlay
from imagesmith.host.background import in_background, settle

SWITCH = "IMAGESMITH_FILESYSTEM_CACHE"


def prepare_filesystem_base(ctx: BuildContext) -> None:
    root = ctx.layout.root
    if (
        ctx.image.target != "disk"
        or root.filesystem not in fscache.VERSION_ARGV
        # An ext4 entry has the root's size, which "auto" takes from the tree.
        or (root.filesystem == "ext4" and ctx.image.settings.size == AUTO_SIZE)
        or ctx.pristine_tree is None
        # A stage made from a parent, extracted: no pristine copy to make it from.
        or (not ctx.tree_overlay and ctx.stage_cache is not None and not ctx.stage_cache.hit)
        or os.environ.get(SWITCH) == "0"
    ):
        return
    fs = root.filesystem
    key = fscache.filesystem_key(
        ctx.pristine_key, label=root.label, tool=fscache.mkfs_version(fs), filesystem=fs,
        size=None if ctx.image.settings.size == AUTO_SIZE else root.size,
    )  # fmt: skip
    with fscache.locked(ctx.cache_dir, key):
        entry = fscache.usable_entry(ctx.cache_dir, key)
    ctx.filesystem_cache = CacheUse(key, hit=entry is not None)
    made: Future[Path]
    copied = None
    if entry is not None:
        log.info(f"    filesystem cache hit {key}")
        made = done(entry)
    elif ctx.tree_overlay:
        # The pristine tree is the overlay's read-only lower layer: the
        # entry is made from it while the classes change the build's view.
        log.info(f"    filesystem cache miss {key}: making the package stage's {fs} meanwhile")
        copied = CopyInto(ctx.disk, root.start, Future())
        made = in_background(locked_base, ctx, key, ctx.pristine_tree, shown=False, copy=copied)
    else:
        log.info(f"    filesystem cache miss {key}: making the package stage's {fs} once")
        try:
            made = done(locked_base(ctx, key, ctx.pristine_tree, shown=True))
        except BuildError:
            return
    ctx.filesystem_base = fscache.entry_dir(ctx.cache_dir, key)
    ctx.base_made = made
    ctx.tree_mark = ctx.tree_mark or incremental.mark(ctx.workdir)
    # Copied into the disk, at the root's offset, while the classes work,
    # and a btrfs's metadata apart, given this build's UUID, for the changes.
    ctx.base_copy = in_background(copy_base, made, ctx.disk, root.start, copied)
    if fs == "btrfs":
        ctx.base_metadata = in_background(
            base_metadata, made, ctx.workdir / "root-metadata.btrfs", root.fs_uuid
        )
    # A build that fails before assembly waits for them (their commands are
    # children of this process), so none outlives it.
    ctx.closing.callback(settle, made, ctx.base_copy, ctx.base_metadata)


def done(value: Path) -> Future[Path]:
    future: Future[Path] = Future()
    future.set_result(value)
    return future


@dataclass(frozen=True)
class CopyInto:
    """Where a build wants the entry it makes: copied into `disk` at
    `offset` while the new entry is hashed; `done` gets the copy's size, or
    its error. Left unset when the entry was not made by this build."""

    disk: Path
    offset: int
    done: Future[int]


def locked_base(
    ctx: BuildContext, key: str, pristine: Path, *, shown: bool, copy: CopyInto | None = None
) -> Path:
    """The entry for `key`, made from `pristine` unless another build made it
    while this one waited for the lock; raises BuildError when it could not
    be made (said in a warning)."""
    with fscache.locked(ctx.cache_dir, key):
        entry = fscache.usable_entry(ctx.cache_dir, key) or make_base(
            ctx, key, pristine, shown=shown, copy=copy
        )
    if entry is None:
        raise BuildError("the package stage's filesystem could not be kept")
    return entry


def make_base(
    ctx: BuildContext, key: str, pristine: Path, *, shown: bool, copy: CopyInto | None = None
) -> Path | None:
    """The entry for `key`, made from `pristine`; its progress `shown` as
    the stage's (not from a background thread); copied as `copy` asks while
    it is hashed. None, with a warning, when it could not be made."""
    part = dataclasses.replace(ctx.layout.root, fs_uuid=str(uuid.uuid4()))
    final = fscache.entry_dir(ctx.cache_dir, key)
    digests: dict[str, str] = {}
    try:
        with fscache.new_filesystem(ctx.cache_dir, key, {"uuid": part.fs_uuid}, digests) as temp:
            image = temp / fscache.IMAGE_FILE
            paths = sorted(incremental.tree_state(pristine))
            with (
                log.watch_growth(f"mkfs.{part.filesystem}", image, content_estimate(ctx))
                if shown
                else contextlib.nullcontext()
            ):
                if part.filesystem == "btrfs":
                    make_base_btrfs(ctx, image, part, pristine, paths)
                else:
                    image.touch()
                    make_ext4(image, dataclasses.replace(part, start=0), pristine)
            (temp / fscache.PATHS_FILE).write_bytes(b"\0".join(paths))
            digests[fscache.IMAGE_FILE] = hash_while_copying(image, copy)
    except (BuildError, OSError) as e:
        entries.warn_not_saved("the package stage's btrfs", final, reason(e))
        return None
    return final


def hash_while_copying(image: Path, copy: CopyInto | None) -> str:
    """The new entry's SHA-256, its holes hashed from memory; meanwhile a
    child process copies it as `copy` asks (a second reader on the other
    core): a desktop's 5.8 GiB, read once after the other, took 6 s + 7.5 s."""
    if copy is None:
        return sha256_file(image)
    copying = in_background(copy_into, image, copy.disk, copy.offset)
    try:
        return sha256_file(image)
    finally:
        settle(copying)
        if (error := copying.exception()) is not None:
            copy.done.set_exception(error)
        else:
            copy.done.set_result(copying.result())


def make_base_btrfs(
    ctx: BuildContext, image: Path, part: Partition, tree: Path, paths: list[bytes]
) -> None:
    """The cached btrfs written by the kernel (`kernel_filled`), the
    estimate's size or the root's; else, as small as mkfs.btrfs makes it."""
    size = fill_size(tree_size(tree)) if ctx.image.settings.size == AUTO_SIZE else part.size
    sized = dataclasses.replace(part, size=size)
    if not kernel_filled(image, sized, tree, offset=0, scratch=ctx.workdir, paths=paths):
        make_btrfs_image(image, part, tree, size=None)


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


def root_from_base(ctx: BuildContext) -> int | None:
    """The root filesystem from the cached one and the build's changes; its
    size. A btrfs's changes go to the retuned copy of its metadata, laid
    over the copy of the whole by `finish_root_from_base` once the disk's
    partition table is written; an ext4's (or a btrfs's without one), to
    the copy in the disk itself. None when there is no cached one, or it
    could not be used (said in a warning): the caller then makes the whole
    filesystem."""
    entry = ctx.filesystem_base
    if entry is None or ctx.base_copy is None or ctx.base_made is None:
        return None
    root = ctx.layout.root
    metadata = None
    try:
        making = time.monotonic()
        ctx.base_made.result()  # made while the classes worked, on a miss
        making = time.monotonic() - making
        # What changed is listed while the copies may still be running.
        found = listed_changes(ctx, fscache.recorded_paths(entry))
        waited = time.monotonic()
        if ctx.base_metadata is not None:
            try:
                metadata = ctx.base_metadata.result()
            except (BuildError, OSError) as e:
                log.debug(
                    f"    the cached btrfs's metadata could not be copied apart ({reason(e)})"
                )
        target, offset, uuid = (
            (metadata, 0, "") if metadata else (ctx.disk, root.start, root.fs_uuid)
        )
        base = (entry / fscache.IMAGE_FILE).stat().st_size if metadata else ctx.base_copy.result()
        waited = time.monotonic() - waited
        applying = time.monotonic()
        if root.filesystem == "btrfs" and ctx.image.settings.size == AUTO_SIZE:
            size = base + int(found.changed_bytes * incremental.CHANGE_OVERHEAD) + incremental.SLACK
        elif base > root.size:
            raise BuildError(
                f"the cached {root.filesystem} alone ({format_size(base)}) does not fit"
            )
        else:
            size = root.size
        incremental.apply_changes(
            target, offset, ctx.tree, found, size=size, uuid=uuid, fstype=root.filesystem
        )
        if metadata:
            if ctx.disk.stat().st_size < root.start + size:
                os.truncate(ctx.disk, root.start + size)
            ctx.base_overlay = metadata
    except (BuildError, OSError) as e:
        if is_out_of_space(e):
            raise
        give_up_base(ctx, e)
        return None
    applied = time.monotonic() - applying
    if making >= 0.1:
        log.info(f"    waited {making:.1f}s for the package stage's {root.filesystem} to be made")
    log.info(
        f"    {root.filesystem} from the filesystem cache ({waited:.1f}s waiting for its "
        f"{'metadata' if metadata else 'copy'}, {applied:.1f}s applying): {len(found.changed)} "
        f"paths changed ({format_size(found.changed_bytes)}), {len(found.removed)} removed"
    )
    return size


def give_up_base(ctx: BuildContext, error: BuildError | OSError, *, placed: bool = False) -> None:
    """Warn, and take what was copied of the cached btrfs out of the disk:
    all after the root's start, or once the partition table is `placed`,
    the root partition's bytes alone."""
    fs = ctx.layout.root.filesystem
    log.warn(f"the cached {fs} could not be used ({reason(error)}); making the whole filesystem")
    if ctx.filesystem_cache is not None:
        ctx.filesystem_cache = dataclasses.replace(ctx.filesystem_cache, hit=False)
    ctx.base_overlay = None
    settle(ctx.base_copy)  # nothing of the copy may land in the disk after this
    root = ctx.layout.root
    if placed:
        punch_hole(ctx.disk, root.start, root.size)
    else:
        os.truncate(ctx.disk, root.start)


def finish_root_from_base(ctx: BuildContext) -> bool:
    """Lay the changed metadata over the copy of the cached btrfs, once the
    copy is done; the raw disk's SHA-256 is computed from the pieces
    meanwhile. False when the copy failed (its entry is discarded, said in a
    warning): the caller makes the whole filesystem."""
    overlay, root = ctx.base_overlay, ctx.layout.root
    if overlay is None or ctx.base_copy is None or ctx.filesystem_base is None:
        return True
    base = ctx.filesystem_base / fscache.IMAGE_FILE
    digest = None
    if ctx.disk_file is not None:
        digest = in_background(sha256_with_overlay, ctx.disk, root.start, base, overlay)
    try:
        ctx.base_copy.result()
        copy_sparse(overlay, ctx.disk, offset=root.start)
    except (BuildError, OSError) as e:
        settle(digest)  # it reads the overlay and the range given up below
        overlay.unlink(missing_ok=True)
        if is_out_of_space(e):
            raise
        give_up_base(ctx, e, placed=True)
        return False
    try:
        if digest is not None:
            ctx.output_sha256["raw"] = digest.result()
    finally:
        overlay.unlink(missing_ok=True)
    return True


def listed_changes(ctx: BuildContext, cached_paths: set[bytes]) -> incremental.Changes:
    """What the build changed in the tree: from the overlay's upper layer
    when the tree is mounted, else (or when that cannot tell) by ctime."""
    if ctx.tree_overlay:
        upper = overlay.upper_layer(ctx.overlay_scratch)
        if (found := incremental.overlay_changes(ctx.tree, upper, cached_paths)) is not None:
            return found
    return incremental.changes(ctx.tree, ctx.tree_mark, cached_paths)


def base_metadata(made: Future[Path], target: Path, uuid: str) -> Path | None:
    """The cached btrfs's metadata alone in `target`, with the filesystem
    UUID `uuid` (disk/incremental.py), once the entry is `made`; None when
    it cannot be had so."""
    entry = made.result()
    return target if incremental.metadata_copy(entry / fscache.IMAGE_FILE, target, uuid) else None


def copy_base(made: Future[Path], disk: Path, offset: int, copied: CopyInto | None = None) -> int:
    """Once the entry is `made`, copy its filesystem into `disk` at `offset`
    (in a child process), hashing it on the way (a second reader on another
    core) unless it matched its SHA-256 before and nothing wrote it since;
    its size. A mismatch discards the entry. An entry this build made was
    `copied` as it was hashed."""
    entry = made.result()
    if copied is not None and copied.done.done():
        return copied.done.result()
    source = entry / fscache.IMAGE_FILE
    digest = None
    if not entries.verified_since(entry, fscache.IMAGE_FILE):
        digest = in_background(sha256_file, source)  # its holes are hashed from memory
    size = copy_into(source, disk, offset)
    if digest is not None:
        if problem := entries.digest_problem(entry, {fscache.IMAGE_FILE: digest.result()}):
            entries.discard(entry, problem)
            raise BuildError(f"cache entry {entry}: {problem}")
        entries.note_verified(entry, fscache.IMAGE_FILE)
    return size


def copy_into(source: Path, disk: Path, offset: int) -> int:
    """Copy the filesystem image `source` into `disk` at `offset`, in a
    child process; its size."""
    disk.touch()
    copy_sparse_apart(source, disk, offset=offset)
    return source.stat().st_size
