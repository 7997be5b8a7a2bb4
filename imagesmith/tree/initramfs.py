"""The initramfs of an image: built once, at the end of boot setup.

While packages install, update-initramfs is diverted to a no-op stub
(`DIVERT_INITRAMFS`, run by the bootstrap stage), so the kernel, the
firmware and every hook package do not each rebuild it. Boot setup puts the
real one back and builds the initramfs once, or takes it from the initramfs
cache (cache/initramfs.py) when nothing it holds changed. A container image
never gets that far: finalise removes the stub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from imagesmith import log
from imagesmith.cache import initramfs as initramfs_cache
from imagesmith.cache.entries import CacheUse
from imagesmith.host.paths import read_in_root, remove_in_root
from imagesmith.host.sandbox import run_in_root

UPDATE_INITRAMFS = "usr/sbin/update-initramfs"
# What the stub says, to tell it from the real update-initramfs.
BUILD_STUB_MARK = b"diverted by imagesmith"
# An mmdebstrap hook: "$1" is the tree.
DIVERT_INITRAMFS = (
    f'chroot "$1" dpkg-divert --quiet --local --rename --add /{UPDATE_INITRAMFS}'
    f' && printf "#!/bin/sh\\n# {BUILD_STUB_MARK.decode()} during the build\\nexit 0\\n"'
    f' > "$1/{UPDATE_INITRAMFS}" && chmod 755 "$1/{UPDATE_INITRAMFS}"'
)


class Sharing(Protocol):
    """The remote cache's part (stages/sharing.py); each returns what happened."""

    def pull(self, key: str) -> str: ...

    def push(self, key: str, pulled: str) -> str: ...


def remove_initramfs_diversion(tree: Path) -> None:
    """Take out the build's update-initramfs stub and its diversion, if still there."""
    stub = read_in_root(tree, UPDATE_INITRAMFS)
    if stub is None or BUILD_STUB_MARK not in stub:
        return
    remove_in_root(tree, UPDATE_INITRAMFS)
    run_in_root(
        tree,
        ["dpkg-divert", "--quiet", "--local", "--rename", "--remove", f"/{UPDATE_INITRAMFS}"],
        what="restoring update-initramfs",
    )


def build_initramfs(
    tree: Path, kernel_version: str, cache_dir: Path, remote: Sharing | None = None
) -> CacheUse | None:
    """The real update-initramfs back, then the initramfs built or reused.
    Returns the initramfs cache entry used, None with the cache disabled.
    With `remote`, a key the local cache lacks is asked of the remote cache,
    and an initramfs built here is offered to it."""
    remove_initramfs_diversion(tree)
    target = f"boot/initrd.img-{kernel_version}"
    if initramfs_cache.initramfs_disabled():
        run_in_root(tree, ["update-initramfs", "-c", "-k", kernel_version], what="update-initramfs")
        return None
    key = initramfs_cache.initramfs_key(tree, kernel_version)
    # Held to the save: an image with the same key waits, then reuses this one.
    with initramfs_cache.locked(cache_dir, key):
        pulled = remote.pull(key) if remote else ""
        if initramfs_cache.reuse_initramfs(cache_dir, key, tree, target):
            where = "remote initramfs cache" if pulled == "hit" else "initramfs cache"
            log.info(f"    {where} hit {key}: update-initramfs skipped")
            return CacheUse(key, hit=True, remote=pulled)
        run_in_root(tree, ["update-initramfs", "-c", "-k", kernel_version], what="update-initramfs")
        initramfs_cache.save_initramfs(cache_dir, key, tree, target)
        pushed = remote.push(key, pulled) if remote else ""
    return CacheUse(key, hit=False, remote=pushed)
