"""The package stage's cached tree as the build's tree (for stages/bootstrap.py).

Kept apart from bootstrap.py, whose code is part of the stage cache's key:
how a tree is restored does not change what is in it.
"""

from __future__ import annotations

import shutil

from imagesmith import log
from imagesmith.cache import stages as stagecache
from imagesmith.context import BuildContext
from imagesmith.host import overlay


def restore_cached_tree(ctx: BuildContext, key: str) -> bool:
    """The cached tree of `key` as the build's tree: mounted as an overlay
    where that can be done (host/overlay.py), else extracted; False on a
    miss. The caller holds the key's lock."""
    if restored := mount_or_extract(ctx, key):
        ctx.tree_key = key
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
    try:
        overlay.mount_overlay(lower, ctx.overlay_scratch, ctx.tree)
    except OSError as e:
        log.warn(f"could not mount the cached tree ({e}); extracting it instead")
        for path in (ctx.tree, ctx.overlay_scratch):
            shutil.rmtree(path, ignore_errors=True)
        return stagecache.restore_tree(ctx.cache_dir, key, ctx.tree)
    ctx.closing.callback(overlay.unmount, ctx.tree)
    ctx.tree_overlay = True
    return True
