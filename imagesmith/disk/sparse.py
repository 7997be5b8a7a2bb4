"""Sparse files: copies that keep holes (in-kernel where the filesystems allow),
and hashes that never read them."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imagesmith.host.enter import LIBC
from imagesmith.host.run import run

CHUNK = 8 * 1024 * 1024
HASH_CHUNK = 4 * 1024 * 1024
ZEROS = memoryview(bytes(HASH_CHUNK))
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def copy_sparse(source: Path, target: Path, *, offset: int) -> None:
    """Copy the data regions of `source` into `target` at `offset`, skipping holes."""
    copy_sparse_range(source, target, src_offset=0, length=source.stat().st_size, dst_offset=offset)


def copy_sparse_apart(source: Path, target: Path, *, offset: int) -> None:
    """`copy_sparse` in a child process: a copy in a thread of a busy
    process takes twice as long, waiting for the interpreter's lock after
    each of its many system calls."""
    run(
        [sys.executable, "-m", "imagesmith.disk.sparse", source, target, str(offset)],
        what=f"copying {source}",
    )


def copy_sparse_range(
    source: Path, target: Path, *, src_offset: int, length: int, dst_offset: int = 0
) -> None:
    """Copy `length` bytes of `source` from `src_offset` to `target` at
    `dst_offset`, skipping holes so sparse files stay sparse."""
    with source.open("rb") as src, target.open("r+b") as dst:
        for data, hole in data_regions(src.fileno(), src_offset, src_offset + length):
            copy_range(
                src.fileno(), dst.fileno(), data, dst_offset + data - src_offset, hole - data
            )


@contextlib.contextmanager
def scratch_file(directory: Path, prefix: str, size: int) -> Iterator[Path]:
    """A sparse file of `size` bytes under an unpredictable name in
    `directory`, removed after the block."""
    fd, name = tempfile.mkstemp(prefix=prefix, dir=directory)
    path = Path(name)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)


def punch_hole(path: Path, offset: int, length: int) -> None:
    """Make `length` bytes of the file from `offset` a hole (zeros, no blocks)."""
    with path.open("r+b") as f:
        mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        if LIBC.fallocate(f.fileno(), mode, ctypes.c_int64(offset), ctypes.c_int64(length)):
            error = ctypes.get_errno()
            raise OSError(error, f"punching a hole in {path}: {os.strerror(error)}")


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


def sha256_with_overlay(disk: Path, offset: int, base: Path, overlay: Path) -> str:
    """The SHA-256 `disk` will have once `base` is copied into it at
    `offset` and the data regions of `overlay` (holes elsewhere) are copied
    over that: `disk`'s own bytes before `offset` and after the overlay's
    end, where the overlay has data its bytes, elsewhere `base`'s (zeros past
    its end). Computed from the files as they are, while the copies run."""
    digest = hashlib.sha256()
    with disk.open("rb") as d, base.open("rb") as b, overlay.open("rb") as o:
        size = os.fstat(d.fileno()).st_size
        base_size, length = os.fstat(b.fileno()).st_size, os.fstat(o.fileno()).st_size

        def from_base(start: int, end: int) -> None:
            hash_range(digest, b.fileno(), start, min(end, base_size))
            hash_zeros(digest, end - max(start, base_size))

        hash_range(digest, d.fileno(), 0, offset)
        position = 0
        for start, end in data_regions(o.fileno(), 0, length):
            from_base(position, start)
            hash_range(digest, o.fileno(), start, end)
            position = end
        from_base(position, length)
        hash_range(digest, d.fileno(), offset + length, size)
    return digest.hexdigest()


def data_regions(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of the open file between `start` and `end`
    that are data, not holes."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here to the end
            return
        if data >= end:
            return
        position = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, position


def hash_zeros(digest: hashlib._Hash, count: int) -> None:
    while count > 0:
        n = min(HASH_CHUNK, count)
        digest.update(ZEROS[:n])
        count -= n


def hash_range(digest: hashlib._Hash, fd: int, start: int, end: int) -> None:
    """Feed bytes [start, end) of the open file to `digest`, holes from memory."""
    position = start
    for data, hole in data_regions(fd, start, end):
        hash_zeros(digest, data - position)
        while data < hole:
            chunk = os.pread(fd, min(HASH_CHUNK, hole - data), data)
            if not chunk:
                raise OSError(f"short read at offset {data}")
            digest.update(chunk)
            data += len(chunk)
        position = hole
    hash_zeros(digest, end - position)


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


if __name__ == "__main__":  # copy_sparse_apart's child: SOURCE TARGET OFFSET
    try:
        copy_sparse(Path(sys.argv[1]), Path(sys.argv[2]), offset=int(sys.argv[3]))
    except OSError as e:  # "No space left on device" is how the build tells a full disk
        sys.exit(f"copying {sys.argv[1]} into {sys.argv[2]}: {e.strerror or e}")
