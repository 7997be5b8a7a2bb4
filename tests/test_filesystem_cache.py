"""The filesystem cache: a btrfs root made from the package stage's cached
btrfs plus the build's changes is the filesystem a whole mkfs makes.

- host/copyin.py, on a real btrfs: every kind of change (content, modes,
  owners, xattrs, hard links, fifos, a directory turned symlink and back,
  removals) arrives, and a symlink in the image that points at a host path
  leads nowhere outside the image;
- a real build: the example's btrfs server, and its ext4 server, from the
  cache and made whole, same seed, hold the same files, the UUID is this
  build's, and the filesystem checker finds nothing wrong.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imagesmith.config.layout import Partition
from imagesmith.disk import incremental
from imagesmith.disk.filesystems import fill_btrfs
from imagesmith.disk.sparse import sha256_file
from imagesmith.host.copyin import PARALLEL_FROM
from tests.conftest import EXAMPLES, empty_stage_cache, imagesmith

# Prints {path: description} of a mounted root, for comparing two filesystems.
DESCRIBE = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
links = {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in sorted(dirnames + filenames):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)
        st = os.lstat(path)
        what = [stat.filemode(st.st_mode), st.st_uid, st.st_gid]
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                what.append(hashlib.sha256(f.read()).hexdigest())
            if st.st_nlink > 1:
                what.append("linked with " + links.setdefault(st.st_ino, rel))
        elif stat.S_ISLNK(st.st_mode):
            what.append(os.readlink(path))
        if sys.argv[2] == "times" and not stat.S_ISDIR(st.st_mode):
            what.append(st.st_mtime_ns // 10**9)  # mkfs.btrfs 6.2 --rootdir keeps seconds
        if not stat.S_ISLNK(st.st_mode):
            what += sorted(f"{n}={os.getxattr(path, n).hex()}" for n in os.listxattr(path))
        out[rel] = what
print(json.dumps(out))
"""


def describe(image: Path, *, offset: int = 0, times: bool = False) -> dict[str, list[object]]:
    """What the btrfs in `image` (at `offset`) holds, mounted read-only in a
    mount namespace of its own."""
    script = (
        f'set -e; d=$(mktemp -d); mount -o loop,ro,offset={offset} "$1" "$d"; '
        f'"$2" -c "$3" "$d" {"times" if times else "no-times"}; umount "$d"; rmdir "$d"'
    )
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
         image, sys.executable, DESCRIBE],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/kept").write_text("unchanged\n")
    (root / "etc/edited").write_text("before\n")
    (root / "etc/gone").write_text("removed later\n")
    (root / "var/lib/old").mkdir(parents=True)
    (root / "var/lib/old/child").write_text("in a directory that goes\n")
    (root / "opt").mkdir()
    (root / "opt/escape").symlink_to("/nonexistent")
    (root / "srv").mkdir()
    (root / "srv/was-dir").mkdir()
    (root / "srv/was-dir/file").write_text("x\n")


def change_tree(root: Path, victim: Path) -> None:
    """What a customise stage might do, hostile parts included."""
    (root / "etc/edited").write_text("after, and longer than before\n")
    (root / "etc/edited").chmod(0o4755)
    os.chown(root / "etc/edited", 1234, 5678)
    (root / "etc/gone").unlink()
    (root / "var/lib/old/child").unlink()
    (root / "var/lib/old").rmdir()
    (root / "etc/new").write_bytes(os.urandom(100_000))
    os.setxattr(root / "etc/new", "user.imagesmith", b"kept")
    os.link(root / "etc/new", root / "etc/new-link")
    os.mkfifo(root / "etc/fifo", 0o666)
    (root / "etc/fifo").chmod(0o666)  # past the umask, as a device node in /dev is
    # The image's symlink to the host becomes a directory, and a directory
    # becomes a symlink to a host path with a file "in" it on the old side.
    (root / "opt/escape").unlink()
    (root / "opt/escape").mkdir()
    (root / "opt/escape/inside").write_text("in the image\n")
    (root / "srv/was-dir/file").unlink()
    (root / "srv/was-dir").rmdir()
    (root / "srv/was-dir").symlink_to(victim)


def cached_btrfs(tree: Path, scratch: Path) -> tuple[Path, set[bytes], int]:
    """What the filesystem cache keeps of `tree` (a btrfs as small as its
    content, made in `scratch`, and its paths), and the mark after which a
    change to the tree counts."""
    image = scratch / "root.img"
    image.write_bytes(b"")
    subprocess.run(
        ["mkfs.btrfs", "-q", "--rootdir", tree, "--shrink", image], check=True, capture_output=True
    )
    return image, set(incremental.tree_state(tree)), incremental.mark(scratch)


@pytest.mark.build
def test_copyin_applies_every_kind_of_change_and_never_leaves_the_image(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    image, paths, since = cached_btrfs(tree, tmp_path)
    victim = tmp_path / "host-victim"
    victim.mkdir()
    (victim / "precious").write_text("host data\n")
    change_tree(tree, victim)

    found = incremental.changes(tree, since, paths)
    assert b"etc/kept" not in found.changed
    assert {b"etc/gone", b"var/lib/old", b"var/lib/old/child", b"srv/was-dir/file"} == set(
        found.removed
    )
    uuid = "0badc0de-0000-4000-8000-000000000001"
    incremental.apply_changes(image, 0, tree, found, size=256 * 1024**2, uuid=uuid)

    expected = describe_tree(tree)
    assert describe(image, times=True) == expected
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
    blkid = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "UUID", image], capture_output=True, text=True
    )
    assert blkid.stdout.strip() == uuid
    assert image.stat().st_size == 256 * 1024**2
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()


@pytest.mark.build
def test_the_kernel_writes_a_btrfs_that_holds_the_whole_tree(tmp_path: Path) -> None:
    """disk/filesystems.py fill_btrfs, at an offset in a disk file, with
    enough paths for host/copyin.py to copy them in parallel."""
    tree = tmp_path / "tree"
    make_tree(tree)
    victim = tmp_path / "host-victim"
    victim.mkdir()
    (victim / "precious").write_text("host data\n")
    change_tree(tree, victim)
    many = tree / "usr/share/many"
    many.mkdir(parents=True)
    for i in range(PARALLEL_FROM):
        (many / f"f{i}").write_text(str(i) * (i % 7))
    for i in range(0, 200, 3):  # hard links, each name in another corner of the tree
        os.link(many / f"f{i}", tree / "etc" / f"link{i}")
    part = Partition(2, "root", "", "", 1024**2, 256 * 1024**2, "btrfs",
                     "0badc0de-0000-4000-8000-000000000002", "root")  # fmt: skip
    disk = tmp_path / "disk.raw"
    fill_btrfs(disk, part, tree, offset=part.start, scratch=tmp_path)

    assert describe(disk, offset=part.start, times=True) == describe_tree(tree)
    assert disk.stat().st_size == part.start + part.size
    checked = fsck(disk, part.start, part.size, "btrfs")
    assert checked.returncode == 0, (checked.stdout + checked.stderr)[-3000:]
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()


def describe_tree(tree: Path) -> dict[str, list[object]]:
    """The same description of a plain directory."""
    result = subprocess.run(
        [sys.executable, "-c", DESCRIBE, tree, "times"], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def fsck(raw: Path, offset: int, size: int, filesystem: str) -> subprocess.CompletedProcess[str]:
    """The filesystem checker, read-only, on `size` bytes of `raw` at `offset`."""
    check = {"btrfs": "btrfs check --readonly", "ext4": "e2fsck -fn"}[filesystem]
    script = f'set -e; d=$(losetup -r -f --show -o {offset} --sizelimit {size} "$1"); ' + (
        f'{check} "$d"; s=$?; losetup -d "$d"; exit $s'
    )
    return subprocess.run(["sh", "-c", script, "sh", raw], capture_output=True, text=True)


@pytest.mark.build
@pytest.mark.parametrize("image", ["server-btrfs", "server"])
def test_a_root_from_the_filesystem_cache_matches_a_whole_mkfs(
    built_examples: Path, tmp_path: Path, image: str
) -> None:
    outputs = {}
    # A btrfs made whole is written by the kernel (fill_btrfs), or by
    # mkfs.btrfs where that cannot be: both are compared with the cached one.
    ways = [("cached", "1", "1"), ("whole", "0", "1")]
    if image == "server-btrfs":
        ways.append(("mkfs", "0", "0"))
    for name, cache, fill in ways:
        out = tmp_path / name
        result = imagesmith(
            "build", "-C", EXAMPLES, "-o", out, "--uuid-seed", "same", image,
            env={**os.environ, "IMAGESMITH_FILESYSTEM_CACHE": cache,
                 "IMAGESMITH_KERNEL_FILL": fill},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        from_cache = re.search(
            r"(btrfs|ext4) from the filesystem cache \(.*?\): (\d+) paths changed", result.stderr
        )
        assert bool(from_cache) == (cache == "1"), result.stderr[-3000:]
        by_kernel = "btrfs written by the kernel" in result.stderr
        assert by_kernel == (name == "whole" and image == "server-btrfs"), result.stderr[-3000:]
        outputs[name] = out / f"{image}.raw"
    manifest = json.loads((tmp_path / f"cached/{image}.manifest.json").read_text())
    root = manifest["disk"]["partitions"][-1]
    cached = describe(outputs["cached"], offset=root["start"])
    assert len(cached) > 10_000
    for name in outputs.keys() - {"cached"}:
        whole = describe(outputs[name], offset=root["start"])
        different = {
            path for path in cached.keys() | whole.keys() if cached.get(path) != whole.get(path)
        }
        assert not different, (name, sorted(different)[:20])
    blkid = subprocess.run(
        ["blkid", "-p", "-O", str(root["start"]), "-o", "value", "-s", "UUID", outputs["cached"]],
        capture_output=True, text=True,
    )  # fmt: skip
    assert blkid.stdout.strip() == root["fs_uuid"]
    checked = fsck(outputs["cached"], root["start"], root["size"], root["filesystem"])
    assert checked.returncode == 0, (checked.stdout + checked.stderr)[-3000:]
    # Hashed from the pieces while they were copied (btrfs), or as written:
    # the same as reading the file.
    assert manifest["outputs"]["raw"]["sha256"] == sha256_file(outputs["cached"])


@pytest.mark.build
def test_a_cold_build_makes_the_cached_btrfs_while_the_classes_work(tmp_path: Path) -> None:
    """After a stage cache miss, the tree mmdebstrap made is the overlay's
    lower layer: the stage's tar and the cached btrfs are made from it in
    the background, the build's root is that btrfs plus its changes, and
    the next build hits both caches."""
    cache = empty_stage_cache(tmp_path)
    runs = {}
    for name in ("cold", "warm"):
        result = imagesmith(
            "build", "-C", EXAMPLES, "-o", tmp_path / name, "--cache-dir", cache,
            "--uuid-seed", "same", "server-btrfs",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = result.stderr
    assert "stage cache miss" in runs["cold"]
    assert re.search(r"package stage saved to the cache in [\d.]+s", runs["cold"]), runs["cold"]
    assert re.search(r"stage cache hit \w+: mmdebstrap skipped", runs["warm"]), runs["warm"]
    assert "making the package stage's btrfs meanwhile" in runs["cold"], runs["cold"][-3000:]
    assert "btrfs from the filesystem cache" in runs["cold"], runs["cold"][-3000:]
    assert "filesystem cache hit" in runs["warm"], runs["warm"][-3000:]
    assert "btrfs from the filesystem cache" in runs["warm"]
    manifest = json.loads((tmp_path / "cold/server-btrfs.manifest.json").read_text())
    assert manifest["caches"]["filesystem_cache"]["hit"] is False
    root = manifest["disk"]["partitions"][-1]
    raw = {name: tmp_path / name / "server-btrfs.raw" for name in runs}
    cold = describe(raw["cold"], offset=root["start"])
    assert len(cold) > 10_000
    assert cold == describe(raw["warm"], offset=root["start"])
    checked = fsck(raw["cold"], root["start"], root["size"], "btrfs")
    assert checked.returncode == 0, (checked.stdout + checked.stderr)[-3000:]
    assert manifest["outputs"]["raw"]["sha256"] == sha256_file(raw["cold"])
    assert not list(cache.glob("filesystems/.tmp-*/"))  # no half-made entry left
    assert not list(cache.glob("stages/.tmp-*/"))
    # The entry was hashed while it was copied into the cold build's disk:
    # its recorded digest is its file's.
    (entry,) = (p for p in cache.glob("filesystems/*/") if not p.name.startswith("."))
    recorded = json.loads((entry / "digest.json").read_text())["root.img"]["sha256"]
    assert recorded == sha256_file(entry / "root.img")


@pytest.mark.build
def test_a_damaged_filesystem_entry_is_discarded_and_the_build_goes_on(
    built_examples: Path, tmp_path: Path
) -> None:
    first = imagesmith("build", "-C", EXAMPLES, "-o", tmp_path / "a", "server-btrfs")
    assert first.returncode == 0, first.stderr[-3000:]
    key = re.search(r"filesystem cache (?:hit|miss) (\w+)", first.stderr)
    assert key, first.stderr[-3000:]
    image = Path("/var/cache/imagesmith/filesystems") / key.group(1) / "root.img"
    with image.open("r+b") as f:  # same size, other bytes: only the SHA-256 can tell
        f.seek(image.stat().st_size // 2)
        f.write(b"\xde\xad\xbe\xef" * 1024)

    second = imagesmith("build", "-C", EXAMPLES, "-o", tmp_path / "b", "server-btrfs")
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(
        r"warning: cache entry \S+ is damaged: root.img does not match its SHA-256", second.stderr
    ), second.stderr[-3000:]
    assert "making the whole filesystem" in second.stderr
    assert not image.parent.exists()
    # The damage shows once the copy is read through, after the changes
    # were applied to the metadata apart: the root is then made whole, in
    # the partition already laid out.
    raw = tmp_path / "b/server-btrfs.raw"
    manifest = json.loads((tmp_path / "b/server-btrfs.manifest.json").read_text())
    assert manifest["caches"]["filesystem_cache"]["hit"] is False
    assert manifest["outputs"]["raw"]["sha256"] == sha256_file(raw)
    root = manifest["disk"]["partitions"][-1]
    assert len(describe(raw, offset=root["start"])) > 10_000

    third = imagesmith("build", "-C", EXAMPLES, "-o", tmp_path / "c", "server-btrfs")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"filesystem cache miss {key.group(1)}" in third.stderr
    assert "btrfs from the filesystem cache" in third.stderr
