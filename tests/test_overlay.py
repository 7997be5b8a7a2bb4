"""The cached tree mounted as the build's tree (host/overlay.py), on the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts an overlay")

CHILD = r"""
import os, sys
from pathlib import Path
from imagesmith.host import overlay
lower, scratch, target = map(Path, sys.argv[1:4])
assert overlay.enter_private_namespace()
assert overlay.usable(lower, scratch)
overlay.mount_overlay(lower, scratch, target)
(target / "etc/hostname").write_text("changed\n")
(target / "etc/removed").unlink()
(target / "etc/new").write_text("new\n")
os.chmod(target / "etc/moded", 0o600)
import shutil
shutil.rmtree(target / "var/lib/old")  # a directory made anew: opaque
(target / "var/lib/old").mkdir()
(target / "var/lib/old/fresh").write_text("fresh\n")
print("written:", sorted(overlay.written_files(scratch)))
from imagesmith.disk.incremental import overlay_changes
cached = {p.encode() for p in sys.argv[4].split(",")}
found = overlay_changes(target, overlay.upper_layer(scratch), cached)
print("removed:", sorted(p.decode() for p in found.removed))
print("changed:", sorted(p.decode() for p in found.changed))
with open(target / "usr/bin/tool", "a") as f:  # one name of a hard-linked file
    f.write("more\n")
print("tool-link:", (target / "usr/bin/tool-alias").read_text().splitlines())
print("with a hard link:", overlay_changes(target, overlay.upper_layer(scratch), cached))
print("mounted:", any(f" {target} " in line for line in open("/proc/self/mounts")))
overlay.unmount(target)
print("after:", sorted(os.listdir(target)))
"""


@needs_root
def test_an_overlay_tree_writes_beside_the_cached_tree_and_keeps_hard_links(
    tmp_path: Path,
) -> None:
    lower, scratch, target = tmp_path / "lower", tmp_path / "scratch", tmp_path / "root"
    (lower / "etc").mkdir(parents=True)
    (lower / "usr/bin").mkdir(parents=True)
    for name in ("hostname", "removed", "moded"):
        (lower / "etc" / name).write_text(f"{name}\n")
    (lower / "var/lib/old/sub").mkdir(parents=True)
    (lower / "var/lib/old/sub/gone").write_text("gone\n")
    (lower / "var/lib/old/gone").write_text("gone\n")
    (lower / "usr/bin/tool").write_text("tool\n")
    os.link(lower / "usr/bin/tool", lower / "usr/bin/tool-alias")
    before = {p: p.read_bytes() for p in lower.rglob("*") if p.is_file()}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, lower, scratch, target, cached_paths(lower)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "tool-link: ['tool', 'more']" in out, out
    written = "written: ['etc/hostname', 'etc/moded', 'etc/new', 'var/lib/old/fresh']"
    assert written in out, out
    # What a btrfs made from the cached tree needs to become this one.
    removed = (
        "removed: ['etc/removed', 'var/lib/old/gone', 'var/lib/old/sub', 'var/lib/old/sub/gone']"
    )
    assert removed in out, out
    changed = (
        "changed: ['etc', 'etc/hostname', 'etc/moded', 'etc/new', "
        "'var', 'var/lib', 'var/lib/old', 'var/lib/old/fresh']"
    )
    assert changed in out, out
    # A written file with another name: the upper layer cannot list them all.
    assert "with a hard link: None" in out, out
    assert "mounted: True" in out and "after: []" in out, out
    # The cached tree is never changed, and this namespace never saw the mount.
    assert {p: p.read_bytes() for p in lower.rglob("*") if p.is_file()} == before
    assert (lower / "etc/moded").stat().st_mode & 0o777 != 0o600
    assert not any(
        f" {target} " in line for line in Path("/proc/self/mounts").read_text().splitlines()
    )


def cached_paths(lower: Path) -> str:
    return ",".join(str(p.relative_to(lower)) for p in lower.rglob("*"))


def test_no_overlay_when_switched_off_or_a_path_would_be_misread(tmp_path: Path) -> None:
    code = (
        "from pathlib import Path; from imagesmith.host import overlay; "
        "print(overlay.enter_private_namespace(), overlay.usable(Path('/a,b')), "
        "overlay.usable(Path('/x:y')))"
    )
    env = {**os.environ, "IMAGESMITH_TREE_OVERLAY": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False", "False"], out.stderr
