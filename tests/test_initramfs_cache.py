"""When a cached initramfs may be reused: the key, the tracked files, the cpio reader.

Small real trees and real archives (newc written here, compressed with gzip
and the host's zstd); the build tests in test_stage_cache_build.py compare a
reused initramfs with a freshly built one.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from imagesmith.cache import initramfs

KVER = "6.12.0-1-amd64"


def newc(files: dict[str, bytes]) -> bytes:
    """A newc cpio archive of regular files (the format the kernel unpacks)."""
    out = bytearray()

    def entry(name: str, data: bytes, mode: int) -> None:
        fields = [1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for name, data in files.items():
        entry(name, data, 0o100644)
    entry("TRAILER!!!", b"", 0)
    return bytes(out)


def make_tree(root: Path) -> None:
    (root / "usr/lib/modules" / KVER / "kernel").mkdir(parents=True)
    (root / "usr/lib/modules" / KVER / "kernel/virtio.ko").write_bytes(b"module")
    (root / "usr/lib/modules" / KVER / "modules.dep").write_text("kernel/virtio.ko:\n")
    os.symlink("usr/lib", root / "lib")
    (root / "usr/bin").mkdir()
    (root / "usr/bin/busybox").write_bytes(b"busybox binary")
    (root / "etc/initramfs-tools").mkdir(parents=True)
    (root / "etc/initramfs-tools/modules").write_text("# modules\n")
    (root / "etc/fstab").write_text("PARTUUID=1111  /  ext4  defaults  0  1\n")
    (root / "etc/motd").write_text("hello\n")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("Package: busybox\nVersion: 1\n")


def test_cpio_reader_handles_early_and_compressed_parts(tmp_path: Path) -> None:
    early = newc({"kernel/x86/microcode/GenuineIntel.bin": b"ucode"})
    main = newc({"usr/bin/busybox": b"busybox binary", "./init": b"#!/bin/sh\n"})
    for compressed in (gzip.compress(main), zstd(main)):
        image = tmp_path / "initrd.img"
        image.write_bytes(early + compressed)
        assert initramfs.cpio_files(image) == {
            "kernel/x86/microcode/GenuineIntel.bin": b"ucode",
            "usr/bin/busybox": b"busybox binary",
            "init": b"#!/bin/sh\n",
        }


def zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def test_resolve_in_root_follows_the_roots_own_links(tmp_path: Path) -> None:
    make_tree(tmp_path)
    os.symlink("/usr/bin/busybox", tmp_path / "usr/bin/sh")  # absolute: inside the root
    module = initramfs.resolve_in_root(tmp_path, f"lib/modules/{KVER}/kernel/virtio.ko")
    assert module == tmp_path / "usr/lib/modules" / KVER / "kernel/virtio.ko"
    assert initramfs.resolve_in_root(tmp_path, "usr/bin/sh") == tmp_path / "usr/bin/busybox"
    assert initramfs.resolve_in_root(tmp_path, "usr/bin/missing") is None


def test_fstab_shape_ignores_device_names(tmp_path: Path) -> None:
    make_tree(tmp_path)
    before = initramfs.fstab_shape(tmp_path)
    (tmp_path / "etc/fstab").write_text("PARTUUID=2222  /  ext4  defaults  0  1\n")
    assert initramfs.fstab_shape(tmp_path) == before
    (tmp_path / "etc/fstab").write_text("PARTUUID=2222  /  btrfs  defaults  0  0\n")
    assert initramfs.fstab_shape(tmp_path) != before


@pytest.mark.parametrize(
    ("path", "changes_key"),
    [
        ("etc/motd", False),
        ("etc/ssh/sshd_config", False),
        ("etc/initramfs-tools/modules", True),
        ("etc/initramfs-tools/hooks/custom", True),
        ("etc/modprobe.d/blacklist.conf", True),
        ("etc/udev/rules.d/99-x.rules", True),
        ("var/lib/dpkg/status", True),
        (f"usr/lib/modules/{KVER}/modules.dep", True),
        (f"usr/lib/modules/{KVER}/updates/dkms.ko", True),
    ],
)
def test_key_changes_only_with_what_the_initramfs_reads(
    tmp_path: Path, path: str, changes_key: bool
) -> None:
    make_tree(tmp_path)
    before = initramfs.initramfs_key(tmp_path, KVER)
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((target.read_text() if target.exists() else "") + "changed\n")
    assert (initramfs.initramfs_key(tmp_path, KVER) != before) is changes_key
    assert initramfs.initramfs_key(tmp_path, "6.12.0-2-amd64") != before


def test_tracked_files_catch_a_changed_copy(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    image = tmp_path / "initrd.img"
    image.write_bytes(
        gzip.compress(
            newc(
                {
                    "usr/bin/busybox": b"busybox binary",
                    f"lib/modules/{KVER}/kernel/virtio.ko": b"module",
                    "conf/initramfs.conf": b"generated",
                }
            )
        )
    )
    tracked = initramfs.tracked_files(tree, image)
    assert set(tracked) == {"usr/bin/busybox", f"usr/lib/modules/{KVER}/kernel/virtio.ko"}
    assert initramfs.still_matches(tree, tracked)
    (tree / "usr/bin/busybox").write_bytes(b"patched busybox")
    assert not initramfs.still_matches(tree, tracked)


def test_reuse_needs_a_matching_entry(tmp_path: Path) -> None:
    tree, cache = tmp_path / "tree", tmp_path / "cache"
    make_tree(tree)
    (tree / "boot").mkdir()
    built = tree / "boot/built.img"
    built.write_bytes(gzip.compress(newc({"usr/bin/busybox": b"busybox binary"})))
    target = tree / f"boot/initrd.img-{KVER}"
    assert not initramfs.reuse_initramfs(cache, "k", tree, f"boot/initrd.img-{KVER}")
    initramfs.save_initramfs(cache, "k", tree, "boot/built.img")
    assert initramfs.reuse_initramfs(cache, "k", tree, f"boot/initrd.img-{KVER}")
    assert target.read_bytes() == built.read_bytes()
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    (tree / "usr/bin/busybox").write_bytes(b"other")
    assert not initramfs.reuse_initramfs(cache, "k", tree, f"boot/initrd.img-{KVER}")


def test_key_is_the_same_on_any_filesystem(tmp_path: Path) -> None:
    """tmpfs and ext4 give directories different sizes; the key must not see them."""
    make_tree(tmp_path)
    before = initramfs.initramfs_key(tmp_path, KVER)
    modules = tmp_path / "usr/lib/modules" / KVER / "kernel"
    for i in range(200):  # grows the directory's own size on most filesystems
        (modules / f"pad-{i:03d}-{'x' * 100}").mkdir()
    for i in range(200):
        (modules / f"pad-{i:03d}-{'x' * 100}").rmdir()
    assert initramfs.initramfs_key(tmp_path, KVER) == before
