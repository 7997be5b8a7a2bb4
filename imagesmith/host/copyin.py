"""Apply a list of changes from one tree to a btrfs in a file, chrooted into
the filesystem so that no path can lead out of it.

Runs in a mount namespace of its own (made by `unshare`). It attaches a loop
device to the filesystem's byte range of the file (a partition of a disk
image), with autoclear set and a descriptor held: the device goes away when
this process does, however it ends. It gives the filesystem a new UUID when
asked (btrfstune), mounts it, grows it to the range, then a forked child
chroots into the mount and, with the source tree open as a directory, removes
what is gone and copies what changed: files, directories, symlinks, device
nodes, fifos, hard links, owners, modes, extended attributes (capabilities,
ACLs) and times; a whole tree (disk/filesystems.py `fill_btrfs`) with the
files shared out among one forked child per core. Symlinks in the image,
even absolute ones, resolve inside it, as the class scripts' writes do. The parent unmounts when the child is
done; were it killed, the namespace goes with it and nothing stays mounted.

Only this project's code runs with the image as root: no tool of the image.

Usage: python -m imagesmith.host.copyin FSTYPE FILE OFFSET SIZE UUID MOUNTPOINT TREE CHANGED REMOVED
FSTYPE is btrfs or ext4; CHANGED and REMOVED are files of NUL-separated
paths relative to the tree; UUID "" keeps the filesystem's. A btrfs is
grown to SIZE; an ext4 already has its size.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
LOOP_CTL_GET_FREE, LOOP_CONFIGURE, LO_FLAGS_AUTOCLEAR = 0x4C82, 0x4C0A, 4
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def attach_loop(path: str, offset: int, size: int) -> tuple[int, str]:
    """A loop device over `size` bytes of `path` from `offset`; returns the
    open device and its name. Autoclear: it detaches when the last holder of
    it closes, so when this process ends, however it ends."""
    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(20):  # another process may take the free one first
                name = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
                device = os.open(name, os.O_RDWR | os.O_CLOEXEC)
                # struct loop_config: fd, block_size, struct loop_info64, reserved
                info = struct.pack("=5Q4I64s64s32s2Q", 0, 0, 0, offset, size, 0, 0, 0,
                                   LO_FLAGS_AUTOCLEAR, b"", b"", b"", 0, 0)  # fmt: skip
                try:
                    fcntl.ioctl(
                        device, LOOP_CONFIGURE, struct.pack("=II", backing, 0) + info + bytes(64)
                    )
                    return device, name
                except OSError:
                    os.close(device)
                    time.sleep(0.05)
            raise OSError(f"no free loop device for {path}")
        finally:
            os.close(control)
    finally:
        os.close(backing)  # the device holds the file now


def remove(path: bytes) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def copy_xattrs(source: int, target: int) -> None:
    """Extended attributes from one open file to another, stale ones removed."""
    wanted = {name: os.getxattr(source, name) for name in os.listxattr(source)}
    for name in os.listxattr(target):
        if name not in wanted:
            os.removexattr(target, name)
    for name, value in wanted.items():
        os.setxattr(target, name, value)


def copy_content(source: int, target: int, size: int) -> None:
    offset = 0
    while offset < size:  # sendfile: copy_file_range refuses two filesystems
        sent = os.sendfile(target, source, offset, size - offset)
        if sent == 0:
            break
        offset += sent


def copy_one(tree: int, path: bytes, links: dict[tuple[int, int], bytes]) -> os.stat_result:
    """Make `path` what it is in the tree; returns the tree's stat of it."""
    st = os.stat(path, dir_fd=tree, follow_symlinks=False)
    mode = st.st_mode
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        here = None
    if here is not None and not (stat.S_ISDIR(mode) and stat.S_ISDIR(here.st_mode)):
        remove(path)
        here = None
    if stat.S_ISREG(mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
        os.link(links[(st.st_dev, st.st_ino)], path, follow_symlinks=False)
        return st
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # symlinks, devices, fifos, sockets
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(path, dir_fd=tree), path)
        else:
            os.mknod(path, mode, st.st_rdev)
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(mode):  # mknod applied the umask
            os.chmod(path, stat.S_IMODE(mode))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return st
    if stat.S_ISDIR(mode):
        if here is None:
            os.mkdir(path, 0o700)
        flags = os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW
        source, target = os.open(path, flags, dir_fd=tree), os.open(path, flags)
    else:
        source = os.open(path, os.O_RDONLY | NOFOLLOW, dir_fd=tree)
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        copy_content(source, target, st.st_size)
        if st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = path
    try:
        os.fchown(target, st.st_uid, st.st_gid)  # before the mode: chown clears set-id bits
        os.fchmod(target, stat.S_IMODE(mode))
        copy_xattrs(source, target)  # after chown, which drops capabilities
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(source)
        os.close(target)
    return st


# From this many paths on (a whole tree rather than a build's changes), the
# files are copied by one child per core: the kernel's work of writing them
# (checksums, extents) is most of the time, and it spreads.
PARALLEL_FROM = 20000


def apply(tree: int, changed: list[bytes], removed: list[bytes]) -> None:
    """Inside the chroot: children are removed before their parents, parents
    made before their children, and directory times set last (making their
    entries changed them)."""
    for path in sorted(removed, reverse=True):
        remove(path)
    workers = min(os.cpu_count() or 1, 4) if len(changed) >= PARALLEL_FROM else 1
    if workers > 1:
        directories = apply_parallel(tree, sorted(changed), workers)
    else:
        links: dict[tuple[int, int], bytes] = {}
        directories = []
        for path in sorted(changed):
            st = copy_one(tree, path, links)
            if stat.S_ISDIR(st.st_mode):
                directories.append((path, st))
    for path, st in reversed(directories):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def apply_parallel(
    tree: int, changed: list[bytes], workers: int
) -> list[tuple[bytes, os.stat_result]]:
    """The directories made here first, then every other path copied by one
    of `workers` forked children, chosen by inode so that all names of a
    hard-linked file go to the same child. Returns the directories."""
    directories, others = [], []
    links: dict[tuple[int, int], bytes] = {}
    for path in changed:
        st = os.stat(path, dir_fd=tree, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            directories.append((path, copy_one(tree, path, links)))
        else:
            others.append((path, st.st_ino))
    children = []
    for worker in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                share: dict[tuple[int, int], bytes] = {}
                for path, inode in others:
                    if inode % workers == worker:
                        copy_one(tree, path, share)
                code = 0
            except BaseException as e:
                print(f"copying into the image: {e}", file=sys.stderr)
            finally:
                os._exit(code)
        children.append(pid)
    failed = [pid for pid in children if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    if failed:
        raise OSError(f"{len(failed)} of {workers} copying processes failed")
    return directories


def read_list(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return [p for p in f.read().split(b"\0") if p]


# A new filesystem UUID, set before the filesystem is mounted: for ext4 made
# with metadata_csum_seed, only the superblock changes.
RETUNE = {"btrfs": ["btrfstune", "-f", "-U"], "ext4": ["tune2fs", "-U"]}


def main(
    fstype: str, path: str, offset: str, size: str, uuid: str, mountpoint: str, tree_path: str,
    changed: str, removed: str,
) -> int:  # fmt: skip
    if fstype not in RETUNE:
        raise SystemExit(f"copyin: unknown filesystem type {fstype!r}")
    device, name = attach_loop(path, int(offset), int(size))
    if uuid:
        subprocess.run([*RETUNE[fstype], uuid, name], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["mount", "-t", fstype, name, mountpoint], check=True)
    if fstype == "btrfs":
        subprocess.run(["btrfs", "filesystem", "resize", "max", mountpoint], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    paths = read_list(changed), read_list(removed)
    tree = os.open(tree_path, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with its parent
            os.chroot(mountpoint)
            os.chdir("/")
            apply(tree, *paths)
            code = 0
        except BaseException as e:
            print(f"copying into the image: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    subprocess.run(["umount", mountpoint], check=True)
    os.close(device)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    if len(sys.argv) != 10:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
