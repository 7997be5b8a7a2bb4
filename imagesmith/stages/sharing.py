"""Sharing built entries through the remote cache (cache/remote.py).

Two kinds of entry travel between runners: the package stage, which saves
mmdebstrap, and the initramfs, which saves update-initramfs (8 s for the
server example, more for a desktop). Each is looked up in the registry when
the local cache lacks it, and pushed after this build made it, unless the
runner is pull-only or the hygiene scan's secret checks find something in it
that must not leave this build: a build secret (a client key, a password),
any other private key, or apt credentials.

Each function returns what happened, for the manifest's `remote` field:
"hit", "missed", "not asked", "rejected", "unreachable", "pushed", and
"push refused" or "push failed" after the pull's word.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from imagesmith import log
from imagesmith.cache import remote as remotecache
from imagesmith.cache import stages as stagecache
from imagesmith.cache.initramfs import cpio_files
from imagesmith.cache.remote import Kind, RemoteEntryError
from imagesmith.context import BuildContext
from imagesmith.errors import BuildError
from imagesmith.inspect.verify import (
    PRIVATE_KEY,
    ScanContext,
    check_apt_auth,
    check_file_contents,
)


def pull(ctx: BuildContext, key: str, kind: Kind) -> str:
    """Fetch the entry of `key` into the local cache, unless the local cache
    has it; hold the key's lock."""
    remote = ctx.remote_cache
    if remote is None:
        return ""
    if kind.entry_dir(ctx.cache_dir, key).is_dir():
        return "not asked"
    started = time.monotonic()
    try:
        found = remotecache.pull_entry(remote, ctx.cache_dir, key, kind)
    except RemoteEntryError as e:
        log.info(f"    REFUSED {e.message}; it is built here")
        return "rejected"
    except BuildError as e:
        log.info(f"    remote cache unreachable, building the {kind.name} without it: {e.message}")
        return "unreachable"
    if not found:
        log.info(f"    remote cache miss: {kind.name} {key} ({remote.ref})")
        return "missed"
    log.info(f"    pulled {kind.name} {key} from {remote.ref} in {time.monotonic() - started:.1f}s")
    return "hit"


def pushes(ctx: BuildContext, pulled: str) -> bool:
    """Whether this build shares what it makes: a remote cache it may push
    to, reachable when it pulled (`pulled`, what the pull said)."""
    remote = ctx.remote_cache
    return remote is not None and remote.push and pulled != "unreachable"


def push(ctx: BuildContext, key: str, kind: Kind, pulled: str) -> str:
    """Share an entry this build made, unless the runner is pull-only or the
    entry holds what must not leave this build."""
    remote = ctx.remote_cache
    if remote is None or not pushes(ctx, pulled):
        return pulled
    if not kind.entry_dir(ctx.cache_dir, key).is_dir():
        return pulled  # not saved (a full disk): nothing to share
    problems = shareable_problems(ctx, key, kind)
    if problems:
        for line in problems:
            log.info(f"    not shareable: {line}")
        log.info(f"    REFUSED to push {kind.name} {key}: it holds what the build must not share")
        return f"{pulled}; push refused"
    started = time.monotonic()
    try:
        remotecache.push_entry(remote, ctx.cache_dir, key, kind)
    except BuildError as e:
        log.info(f"    pushing {kind.name} {key} failed; the build goes on: {e.message}")
        return f"{pulled}; push failed"
    log.info(f"    pushed {kind.name} {key} to {remote.ref} in {time.monotonic() - started:.1f}s")
    return "pushed" if pulled == "missed" else f"{pulled}; pushed"


@dataclass(frozen=True)
class InitramfsSharing:
    """The initramfs's part of the remote cache, for tree/initramfs.py."""

    ctx: BuildContext

    def pull(self, key: str) -> str:
        return pull(self.ctx, key, remotecache.INITRAMFS)

    def push(self, key: str, pulled: str) -> str:
        return push(self.ctx, key, remotecache.INITRAMFS, pulled)


def shareable_problems(ctx: BuildContext, key: str, kind: Kind = remotecache.STAGE) -> list[str]:
    """What in the entry must not reach every runner that pulls it.

    The package stage: the hygiene scan's secret checks on the tree, and the
    build's secrets in its entry.json. The initramfs: the build's secrets and
    PEM private keys in any of its files (a class can put a key where a hook
    copies it in)."""
    if kind is remotecache.INITRAMFS:
        return initramfs_problems(ctx, key)
    scan = ScanContext(secrets=tuple(ctx.secrets))
    findings = [*check_file_contents(ctx.tree, scan), *check_apt_auth(ctx.tree, scan)]
    problems = [f.line() for f in findings]
    info = (stagecache.entry_dir(ctx.cache_dir, key) / stagecache.ENTRY_FILE).read_bytes()
    if any(secret.strip() and secret.strip() in info for secret in ctx.secrets):
        problems.append(f"build-secret: {stagecache.ENTRY_FILE}: holds a secret the build used")
    return problems


def initramfs_problems(ctx: BuildContext, key: str) -> list[str]:
    entry = remotecache.INITRAMFS.entry_dir(ctx.cache_dir, key)
    secrets = [s.strip() for s in ctx.secrets if s.strip()]
    problems = []
    try:
        files = cpio_files(entry / remotecache.INITRAMFS.files[0][0])
    except (OSError, ValueError, BuildError) as e:
        return [f"initramfs: cannot be read to check it ({e})"]
    for name, data in sorted(files.items()):
        if any(secret in data for secret in secrets):
            problems.append(f"build-secret: initramfs /{name}: holds a secret the build used")
        elif PRIVATE_KEY.search(data):
            problems.append(f"private-key: initramfs /{name}: holds a PEM private key")
    return problems
