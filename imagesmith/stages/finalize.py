"""Stage: finalise the tree: strip build-time state, then prove it is gone.

Needs: the tree after boot setup.
Produces: a tree with none of the build's own state left in it (the host's
resolv.conf, policy-rc.d, apt lists and caches, logs, the machine-id, SSH
host keys), and `ctx.packages`, every installed package with its version,
for the manifest. Then the hygiene scan (inspect/verify.py) runs on the tree and the
build fails on any finding no class waived. The build's no-op update-initramfs goes too where boot
setup did not already put the real one back (a container image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import stat
from pathlib import Path

from imagesmith import log
from imagesmith.cache import entries
from imagesmith.cache import stages as stagecache
from imagesmith.cache.keys import hygiene_key
from imagesmith.context import BuildContext
from imagesmith.errors import BuildError
from imagesmith.host import overlay
from imagesmith.host.paths import (
    empty_dir_in_root,
    listdir_in_root,
    lstat_in_root,
    remove_in_root,
    write_in_root,
)
from imagesmith.host.sandbox import run_in_root
from imagesmith.inspect import verify
from imagesmith.inspect.verify import (
    Baseline,
    ContentFindings,
    ScanContext,
    scan_contents,
    scan_tree,
    secret_digest,
)
from imagesmith.tree.aptsources import write_image_sources
from imagesmith.tree.initramfs import remove_initramfs_diversion

# Paths (relative to the tree) whose contents never ship.
EMPTIED_DIRS = ("var/lib/apt/lists", "var/cache/apt", "var/log/apt", "tmp", "var/tmp")
REMOVED_FILES = (
    "usr/sbin/policy-rc.d",
    "var/lib/dbus/machine-id",
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "etc/apt/apt.conf.d/99mmdebstrap",  # mmdebstrap's --aptopt file: build-only
)
HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def list_packages(ctx: BuildContext) -> list[dict[str, str]]:
    out = run_in_root(
        ctx.tree,
        [
            "dpkg-query", "--show",
            "--showformat=${Package}\\t${Version}\\t${Architecture}\\t${db:Status-Abbrev}\\n",
        ],
        capture=True,
        what="listing installed packages",
    ).decode()  # fmt: skip
    packages = []
    for line in out.splitlines():
        name, version, arch, status = line.split("\t")
        if status.startswith("ii"):
            packages.append({"name": name, "version": version, "architecture": arch})
    return packages


def strip_build_state(ctx: BuildContext) -> None:
    """Every path is resolved inside the tree (host/paths.py): a class that
    left `var/tmp -> /tmp` empties the image's /tmp, never the host's."""
    tree = ctx.tree
    for rel in EMPTIED_DIRS:
        empty_dir_in_root(tree, rel)
    for rel in REMOVED_FILES:
        remove_in_root(tree, rel)
    # Generated on first boot, so every machine gets its own.
    write_in_root(tree, "etc/machine-id", "")
    # sshd-keygen.service makes new ones before sshd starts. With
    # new_ssh_host_keys = false a class ships its own (and waives the finding).
    if ctx.image.settings.new_ssh_host_keys:
        for name in listdir_in_root(tree, "etc/ssh"):
            if fnmatch.fnmatch(name, "ssh_host_*_key*"):
                remove_in_root(tree, f"etc/ssh/{name}")
    # mmdebstrap copied in the build host's resolver config; it must not ship.
    resolv = lstat_in_root(tree, "etc/resolv.conf")
    if resolv is not None and stat.S_ISREG(resolv.st_mode):
        write_in_root(tree, "etc/resolv.conf", "")


def scan_context(ctx: BuildContext) -> ScanContext:
    try:
        host_resolv = HOST_RESOLV_CONF.read_bytes()
    except OSError:
        host_resolv = b""
    return ScanContext(
        secrets=tuple(ctx.secrets),
        build_repositories=tuple(ctx.build_repositories),
        host_resolv_conf=host_resolv,
        waived={finding: reason for finding, (reason, _) in ctx.image.waivers.items()},
    )


def scan_baseline(ctx: BuildContext, scan: ScanContext) -> Baseline | None:
    """With the tree an overlay of the cached package stage, what the content
    scan found in that stage's files (scanned once per entry and set of
    secrets, then remembered in the entry), and the files the build wrote:
    only those are read again. None otherwise."""
    if not ctx.tree_overlay or not ctx.tree_key:
        return None
    key = ctx.tree_key
    lower = stagecache.entry_dir(ctx.cache_dir, key) / stagecache.UNPACKED_DIR
    memo = stagecache.scan_memo(ctx.cache_dir, key, scan_key(ctx, scan))
    try:
        known = ContentFindings.from_json(json.loads(memo.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        known = scan_contents(lower, scan)
        with contextlib.suppress(OSError):  # only an optimisation
            temp = memo.with_name(f"{entries.TEMP_PREFIX}{memo.name}-{os.getpid()}")
            temp.write_text(json.dumps(known.to_json()))
            os.replace(temp, memo)
    return Baseline(known, overlay.written_files(ctx.overlay_scratch))


def scan_key(ctx: BuildContext, scan: ScanContext) -> str:
    """Names a content scan's inputs: the scan's code, and the secrets as
    digests keyed with the host's hygiene key (no guess can be tested)."""
    key = hygiene_key(ctx.cache_dir)
    inputs = [
        hashlib.sha256(Path(verify.__file__).read_bytes()).hexdigest(),
        *sorted(secret_digest(s, key) for s in scan.secrets if s.strip()),
    ]
    return hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:32]


def check_hygiene(ctx: BuildContext) -> None:
    scan = scan_context(ctx)
    scan = dataclasses.replace(scan, baseline=scan_baseline(ctx, scan))
    findings, waived = scan_tree(ctx.tree, scan)
    for finding in waived:
        reason, cls = ctx.image.waivers[finding.code]
        log.info(f"    waived by class {cls}: {finding.line()} ({reason})")
    if findings:
        lines = "\n".join(f"  {f.line()}" for f in findings)
        raise BuildError(
            f"the hygiene scan found {len(findings)} problem(s) in the image:\n{lines}",
            hint="fix the class that leaves it, or waive the finding in its class.toml "
            'with [[waivers]] finding = "..." reason = "..."',
        )


def finalize_tree(ctx: BuildContext) -> None:
    remove_initramfs_diversion(ctx.tree)
    ctx.packages = list_packages(ctx)
    write_image_sources(ctx.tree, ctx.image, ctx.mirror)
    strip_build_state(ctx)
    check_hygiene(ctx)
