"""Sparse copies and hashes (disk/sparse.py), and the btrfs's metadata
changed apart from its data (disk/incremental.py `metadata_copy`): what a
desktop's one-file rebuild is made of.

- a SHA-256 computed from the pieces (a base copied at an offset, an
  overlay's data regions laid over it) is the SHA-256 of the file they make;
- a real btrfs: its metadata alone, given a new UUID and the changes, laid
  over a plain copy of it, is a clean filesystem holding the changed tree.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from imagesmith.disk import incremental
from imagesmith.disk.sparse import (
    copy_sparse,
    punch_hole,
    sha256_file,
    sha256_with_overlay,
    sha256_with_placed,
)
from tests.test_filesystem_cache import cached_btrfs, describe, describe_tree

MiB = 1024 * 1024


def sparse_file(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return path


def test_hashes_from_pieces_are_the_hashes_of_the_file_they_make(tmp_path: Path) -> None:
    offset = 1 * MiB
    disk = sparse_file(
        tmp_path / "disk", 40 * MiB, {0: b"GPT" * 100, 40 * MiB - 4096: b"backup" * 100}
    )
    base = sparse_file(
        tmp_path / "base",
        20 * MiB,
        {0: os.urandom(5000), 3 * MiB: os.urandom(2 * MiB), 20 * MiB - 10: b"x" * 10},
    )
    # The overlay is longer than the base (the filesystem grew), has data
    # where the base has a hole, over base data, and past the base's end.
    overlay = sparse_file(
        tmp_path / "overlay",
        30 * MiB,
        {8192: os.urandom(4096), 4 * MiB: os.urandom(MiB), 25 * MiB: os.urandom(123_456)},
    )
    placed = tmp_path / "placed"
    placed.touch()
    copy_sparse(disk, placed, offset=0)
    expected_placed = sha256_with_placed(placed, offset, base)
    copy_sparse(base, placed, offset=offset)
    assert expected_placed == sha256_file(placed)

    expected = sha256_with_overlay(disk, offset, base, overlay)
    made = tmp_path / "made"
    made.touch()
    copy_sparse(disk, made, offset=0)
    copy_sparse(base, made, offset=offset)
    copy_sparse(overlay, made, offset=offset)
    assert expected == sha256_file(made) == hashlib.sha256(made.read_bytes()).hexdigest()
    # Holes stay holes: only what the pieces hold is allocated.
    assert made.stat().st_blocks * 512 < 12 * MiB

    punch_hole(made, offset + 3 * MiB, MiB)
    assert made.read_bytes()[offset + 3 * MiB : offset + 4 * MiB] == bytes(MiB)
    assert made.stat().st_size == 40 * MiB


@pytest.mark.build
def test_changes_applied_to_the_metadata_alone_make_the_changed_filesystem(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/lib").mkdir(parents=True)
    for n in range(20):  # real data extents, not inline in the metadata
        (tree / f"usr/lib/lib{n}.so").write_bytes(os.urandom(300_000 + n))
    (tree / "etc").mkdir()
    (tree / "etc/config").write_text("before\n")
    (tree / "etc/gone").write_bytes(os.urandom(200_000))
    image, paths, since = cached_btrfs(tree, tmp_path)
    (tree / "etc/config").write_text("after, a longer line than before\n")
    (tree / "etc/gone").unlink()
    (tree / "usr/lib/lib3.so").write_bytes(os.urandom(700_000))
    (tree / "usr/lib/new.so").write_bytes(os.urandom(1_000_000))
    found = incremental.changes(tree, since, paths)

    uuid = "0badc0de-0000-4000-8000-0000000000aa"
    metadata = tmp_path / "metadata.btrfs"
    assert incremental.metadata_copy(image, metadata, uuid)
    # A tenth of a desktop's filesystem; here the data is most of it.
    assert metadata.stat().st_blocks < image.stat().st_blocks
    size = 256 * MiB  # btrfs grows to no less
    incremental.apply_changes(metadata, 0, tree, found, size=size, uuid="")

    disk = tmp_path / "disk"
    disk.touch()
    copy_sparse(image, disk, offset=0)
    os.truncate(disk, size)
    copy_sparse(metadata, disk, offset=0)
    check = subprocess.run(
        ["btrfs", "check", "--readonly", "--check-data-csum", disk], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert describe(disk, times=True) == describe_tree(tree)
    blkid = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "UUID", disk], capture_output=True, text=True
    )
    assert blkid.stdout.strip() == uuid


def test_a_file_with_no_btrfs_metadata_gives_no_copy(tmp_path: Path) -> None:
    junk = sparse_file(tmp_path / "junk.img", 64 * MiB, {0: os.urandom(MiB)})
    target = tmp_path / "metadata"
    try:
        made = incremental.metadata_copy(junk, target, "0badc0de-0000-4000-8000-0000000000ab")
    except Exception as e:  # a BuildError naming the chunk tree read is as good
        assert "chunk tree" in str(e)
    else:
        assert not made
    assert not target.exists()
