"""Sparse files: copies that keep holes (in-kernel where the filesystems allow),
and hashes that never read them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CHUNK = 8 * 1024 * 1024
HASH_CHUNK = 4 * 1024 * 1024
ZEROS = memoryview(bytes(HASH_CHUNK))


def copy_sparse(source: Path, target: Path, *, offset: int) -> None:
    """Copy the data regions of `source` into `target` at `offset`, skipping holes."""
    copy_sparse_range(source, target, src_offset=0, length=source.stat().st_size, dst_offset=offset)


def copy_sparse_range(
    source: Path, target: Path, *, src_offset: int, length: int, dst_offset: int = 0
) -> None:
    """Copy `length` bytes of `source` from `src_offset` to `target` at
    `dst_offset`, skipping holes so sparse files stay sparse."""
    with source.open("rb") as src, target.open("r+b") as dst:
        end = src_offset + length
        position = src_offset
        while position < end:
            try:
                data = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:  # no more data after position
                break
            if data >= end:
                break
            hole = min(os.lseek(src.fileno(), data, os.SEEK_HOLE), end)
            copy_range(
                src.fileno(), dst.fileno(), data, dst_offset + data - src_offset, hole - data
            )
            position = hole


def copy_range(src: int, dst: int, src_pos: int, dst_pos: int, length: int) -> None:
    """Copy bytes between two files; in-kernel where the filesystems allow it."""
    while length > 0:
        try:
            copied = os.copy_file_range(src, dst, length, src_pos, dst_pos)
        except OSError:  # EXDEV and friends: tmpfs to disk on older kernels
            copied = os.pwrite(dst, os.pread(src, min(length, CHUNK), src_pos), dst_pos)
        if copied == 0:
            raise OSError(f"short copy at offset {src_pos}")
        length -= copied
        src_pos += copied
        dst_pos += copied


def sha256_file(path: Path) -> str:
    """The file's SHA-256. Holes are hashed from memory, never read: reading
    a 2 GiB sparse disk's holes through a disk filesystem's page cache costs
    three times the hashing itself."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here to the end
                data = size
            while position < data:
                n = min(HASH_CHUNK, data - position)
                digest.update(ZEROS[:n])
                position += n
            if position >= size:
                break
            hole = os.lseek(fd, position, os.SEEK_HOLE)
            while position < hole:
                chunk = os.pread(fd, min(HASH_CHUNK, hole - position), position)
                if not chunk:
                    raise OSError(f"{path}: short read at offset {position}")
                digest.update(chunk)
                position += len(chunk)
    return digest.hexdigest()


def largest_file_problem(directory: Path, size: int) -> str:
    """Why `directory`'s filesystem cannot hold a sparse file of `size` bytes,
    or "" when it can.

    A sparse disk file takes only what is written into it, so free space says
    nothing about whether a size is possible; what can fail is the file's
    length itself (ext4 with 4 KiB blocks stops at 16 TiB, tmpfs and XFS go
    much further). statvfs has no field for that and pathconf's FILESIZEBITS
    is wrong on tmpfs, so ask the filesystem: make a probe file of that length
    (a hole, nothing is written) and remove it.
    """
    try:  # a random name: builds under -j N share one PID
        fd, name = tempfile.mkstemp(prefix=".imagesmith-size-probe-", dir=directory)
    except OSError as e:
        return f"cannot create a file in {directory}: {e.strerror}"
    probe = Path(name)
    try:
        os.ftruncate(fd, size)
    except OverflowError:
        return "no file can be that large"
    except OSError as e:
        return f"the filesystem of {directory} cannot hold a file that large ({e.strerror})"
    finally:
        os.close(fd)
        probe.unlink()
    return ""
