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
        hash_range(digest, f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return digest.hexdigest()


def sha256_with_placed(disk: Path, offset: int, image: Path) -> str:
    """The SHA-256 `disk` will have once `image` is copied into it at
    `offset` (disk/filesystems.py's place_image), computed from the two files
    as they are: it can run while the copy does, instead of reading the
    whole disk again afterwards."""
    digest = hashlib.sha256()
    with disk.open("rb") as d, image.open("rb") as i:
        size, length = os.fstat(d.fileno()).st_size, os.fstat(i.fileno()).st_size
        hash_range(digest, d.fileno(), 0, offset)
        hash_range(digest, i.fileno(), 0, length)
        hash_range(digest, d.fileno(), offset + length, size)
    return digest.hexdigest()


def hash_range(digest: hashlib._Hash, fd: int, start: int, end: int) -> None:
    """Feed bytes [start, end) of the open file to `digest`, holes from memory."""
    position = start
    while position < end:
        try:
            data = min(os.lseek(fd, position, os.SEEK_DATA), end)
        except OSError:  # ENXIO: only a hole from here to the end
            data = end
        while position < data:
            n = min(HASH_CHUNK, data - position)
            digest.update(ZEROS[:n])
            position += n
        if position >= end:
            break
        hole = min(os.lseek(fd, position, os.SEEK_HOLE), end)
        while position < hole:
            chunk = os.pread(fd, min(HASH_CHUNK, hole - position), position)
            if not chunk:
                raise OSError(f"short read at offset {position}")
            digest.update(chunk)
            position += len(chunk)


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
