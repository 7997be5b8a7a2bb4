"""The package stage's cached tree as the build's tree (for stages/bootstrap.py).

Kept apart from bootstrap.py, whose code is part of the stage cache's key:
how a tree is restored does not change what is in it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagesmith import log
from imagesmith.cache import stages as stagecache
from imagesmith.context import BuildContext
from imagesmith.host import overlay
from imagesmith.host.background import in_background, settle

# In the work directory: the tree mmdebstrap made, under the build's (mount_made_tree).
PRISTINE_DIR = "pristine"


def restore_cached_tree(ctx: BuildContext, key: str) -> bool:
    """The cached tree of `key` as the build's tree: mounted as an overlay
    where that can be done (host/overlay.py), else extracted; False on a
    miss. The caller holds the key's lock."""
    if restored := mount_or_extract(ctx, key):
        ctx.tree_key = ctx.pristine_key = key
        if not ctx.tree_overlay:  # extracted: the tree itself, until the classes change it
            ctx.pristine_tree = ctx.tree
    return restored


def mount_or_extract(ctx: BuildContext, key: str) -> bool:
    if not (
        overlay.usable(ctx.cache_dir, ctx.workdir) and stagecache.has_entry(ctx.cache_dir, key)
    ):
        return stagecache.restore_tree(ctx.cache_dir, key, ctx.tree)
    lower = stagecache.unpacked_tree(ctx.cache_dir, key)
    if lower is None:
        return False
    ctx.closing.enter_context(stagecache.in_use(ctx.cache_dir, key))
    if (refused := mount_tree(ctx, lower)) is not None:
        log.warn(f"could not mount the cached tree ({refused}); extracting it instead")
        return stagecache.restore_tree(ctx.cache_dir, key, ctx.tree)
    return True


def mount_tree(ctx: BuildContext, lower: Path) -> OSError | None:
    """The build's tree as an overlay with `lower` its read-only lower layer,
    unmounted when the build closes; the kernel's refusal, with what was
    made for the mount removed, or None."""
    try:
        overlay.mount_overlay(lower, ctx.overlay_scratch, ctx.tree)
    except OSError as e:
        for path in (ctx.tree, ctx.overlay_scratch):
            shutil.rmtree(path, ignore_errors=True)
        return e
    ctx.closing.callback(overlay.unmount, ctx.tree)
    ctx.tree_overlay = True
    ctx.pristine_tree = lower
    return None


def mount_made_tree(ctx: BuildContext, key: str) -> Path | None:
    """After a stage cache miss: the tree mmdebstrap made, moved aside, as
    the read-only lower layer of the build's tree, so that it stays what the
    stage cache keeps while the classes change the build's view of it, and
    the cached btrfs can be made from it meanwhile. Nothing happens where
    no overlay can be mounted: the build then works on the tree itself.
    Returns where the made tree now is, or None."""
    made = ctx.workdir / PRISTINE_DIR
    if not overlay.usable(ctx.workdir):
        return None
    os.rename(ctx.tree, made)
    if (refused := mount_tree(ctx, made)) is not None:
        log.debug(
            f"    the new tree could not be mounted ({refused}); the build changes it in place"
        )
        os.rename(made, ctx.tree)
        return None
    ctx.pristine_key = key
    return made


def save_meanwhile(
    ctx: BuildContext, key: str, made: Path, info: Mapping[str, Any], lock: contextlib.ExitStack
) -> None:
    """Save `made`, the read-only lower layer of the build's tree, as the
    stage cache's entry for `key` in the background, while the later stages
    work (on a desktop the 4.6 GB tar takes 15 s), and release the key's
    `lock` (held by the caller until now) once it is saved: a build of the
    same key waits for it. The build waits for it before the tree goes."""
    name = ctx.image.name

    def save() -> None:
        with lock, log.prefix(name):
            started = time.monotonic()
            if stagecache.save_tree(ctx.cache_dir, key, made, info):
                log.info(
                    f"    package stage saved to the cache in {time.monotonic() - started:.1f}s"
                )

    ctx.closing.callback(settle, in_background(save))
