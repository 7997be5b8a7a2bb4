"""Paths inside an image tree that never lead out of it.

An image tree is full of symlinks that maintainer scripts and class files
made: absolute ones (`/lib -> usr/lib`) mean the image's root, not the build
host's, and a hostile script can plant `var/tmp -> /tmp` or
`etc/machine-id -> /etc/shadow`. Code on the build host that reads or writes
a tree does it through these functions, which resolve every path the way a
chroot would: nothing they do ever lands outside the tree.

- `open_in_root()`: the kernel's openat2(RESOLVE_IN_ROOT), or the same
  resolution in `resolve_in_root()` on kernels without it;
- `read_in_root()`, `listdir_in_root()`: reading;
- `write_in_root()`, `copy_into_root()`, `makedirs_in_root()`,
  `remove_in_root()`, `empty_dir_in_root()`: writing. A symlink where a file
  is written is replaced by the file, never written through.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from imagesmith.errors import BuildError


def resolve_in_root(root: Path, path: str) -> Path | None:
    """`path` inside `root` with the root's own symlinks followed as a chroot would."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    result = root.joinpath(*resolved)
    return result if result.exists() else None


# openat2(2): resolve a path as if `dirfd` were the root directory, so ".."
# and absolute symlinks never lead out of it; no /proc magic links.
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_have_openat2: bool | None = None


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    if not flags & os.O_CREAT and flags & os.O_TMPFILE != os.O_TMPFILE:
        mode = 0  # openat2 refuses a mode it would not use
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = int(_libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), how, len(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def open_in_root(root: Path, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A file descriptor for `rel` inside `root`, every symlink resolved inside it.

    The kernel does the resolving (openat2 with RESOLVE_IN_ROOT) where it
    can; on kernels without openat2, `resolve_in_root()` does it and the
    last component is opened without following a symlink.
    """
    global _have_openat2
    rel = rel.lstrip("/") or "."
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _have_openat2 is not False:
            try:
                fd = _openat2(rootfd, rel, flags, mode)
                _have_openat2 = True
                return fd
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                _have_openat2 = False
        parent = resolve_in_root(root, os.path.dirname(rel))
        if parent is None or not parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory in the tree", rel)
        return os.open(parent / os.path.basename(rel), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    finally:
        os.close(rootfd)


@contextlib.contextmanager
def dir_in_root(root: Path, rel: str) -> Iterator[int]:
    """An open directory of the tree, for *at() calls on its entries."""
    fd = open_in_root(root, rel, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def makedirs_in_root(root: Path, rel: str, mode: int = 0o755) -> None:
    """`mkdir -p` inside the tree; existing symlinks are followed inside it."""
    try:
        _makedirs_in_root(root, rel, mode)
    except OSError as e:
        raise tree_error(rel, e) from e


def _makedirs_in_root(root: Path, rel: str, mode: int) -> None:
    done = ""
    for part in [p for p in rel.split("/") if p not in ("", ".")]:
        with dir_in_root(root, done) as parent:
            try:
                os.mkdir(part, mode, dir_fd=parent)
            except FileExistsError:
                pass
        done = f"{done}/{part}"
    with dir_in_root(root, done):
        pass  # it is a directory, or this raises


def read_in_root(root: Path, rel: str) -> bytes | None:
    """The content of a regular file of the tree; None if there is none."""
    try:
        fd = open_in_root(root, rel)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def listdir_in_root(root: Path, rel: str) -> list[str]:
    """Names in a directory of the tree; [] if it is not a directory."""
    try:
        with dir_in_root(root, rel) as fd:
            return sorted(os.listdir(fd))
    except OSError:
        return []


def _remove_entry(parent: int, name: str) -> None:
    st = os.lstat(name, dir_fd=parent)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)


def remove_in_root(root: Path, rel: str) -> None:
    """Remove a file, symlink or directory of the tree (never what a symlink
    points to); nothing when it is not in the tree."""
    parent_rel, name = os.path.split(rel.strip("/"))
    try:
        parent = open_in_root(root, parent_rel, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # its directory does not resolve inside the tree: nothing to remove
    try:
        _remove_entry(parent, name)
    except FileNotFoundError:
        pass
    finally:
        os.close(parent)


def empty_dir_in_root(root: Path, rel: str) -> None:
    """Remove everything in a directory of the tree, keeping the directory;
    nothing when it does not resolve to a directory inside the tree."""
    try:
        fd = open_in_root(root, rel, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        for name in os.listdir(fd):
            _remove_entry(fd, name)
    finally:
        os.close(fd)


def write_in_root(root: Path, rel: str, data: bytes | str, *, mode: int = 0o644) -> None:
    """Write a regular file of the tree, making its directories. A symlink or
    other non-file at that name is replaced, never written through."""
    try:
        _write_in_root(root, rel, data, mode)
    except OSError as e:
        raise tree_error(rel, e) from e


def tree_error(rel: str, error: OSError) -> BuildError:
    return BuildError(
        f"cannot write /{rel.strip('/')} in the image: {error.strerror}",
        hint="a class file or script left something in the way (a dangling symlink "
        "or a file where a directory belongs)",
    )


def _write_in_root(root: Path, rel: str, data: bytes | str, mode: int) -> None:
    parent_rel, name = os.path.split(rel.strip("/"))
    _makedirs_in_root(root, parent_rel, 0o755)
    content = data.encode() if isinstance(data, str) else data
    with dir_in_root(root, parent_rel) as parent:
        try:
            st = os.lstat(name, dir_fd=parent)
            if not stat.S_ISREG(st.st_mode):
                _remove_entry(parent, name)
        except FileNotFoundError:
            pass
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
            dir_fd=parent,
        )  # fmt: skip
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            os.fchmod(f.fileno(), mode)


def copy_into_root(source: Path, root: Path, rel: str, *, mode: int = 0o644) -> None:
    """Copy a host file into the tree, as write_in_root() writes."""
    write_in_root(root, rel, source.read_bytes(), mode=mode)


def lstat_in_root(root: Path, rel: str) -> os.stat_result | None:
    """lstat() of a tree path, its parents resolved inside the tree; None if missing."""
    parent_rel, name = os.path.split(rel.strip("/"))
    try:
        with dir_in_root(root, parent_rel) as parent:
            return os.lstat(name, dir_fd=parent)
    except OSError:
        return None
