"""Enter an image root: the inside half of `sandbox.chroot_argv()`.

Runs as PID 1 of fresh mount and PID namespaces made by `unshare`. It mounts
/proc, /sys, a minimal /dev, and tmpfs on /run and /tmp inside the root, adds
the requested bind mounts under /run, then chroots and execs the command.
Everything mounted here lives only in this namespace: when the command ends
(or is killed), the kernel drops the mounts and kills leftover processes.
Nothing is ever mounted in the build host's namespace.

Usage: python -m imagesmith.host.enter ROOT [--bind SRC:DST]... [--ro-bind SRC:DST]... -- CMD...
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18

LIBC = ctypes.CDLL(None, use_errno=True)
HOST_RESOLV = "/etc/resolv.conf"

DEVICES = {  # name: (major, minor)
    "null": (1, 3), "zero": (1, 5), "full": (1, 7),
    "random": (1, 8), "urandom": (1, 9), "tty": (5, 0),
}  # fmt: skip


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    rc = LIBC.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None,
        ctypes.c_ulong(flags), data.encode() if data else None,
    )  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def setup_root(root: str, binds: list[tuple[str, str, bool]]) -> None:
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", f"{root}/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    dev = f"{root}/dev"
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=0755")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"{dev}/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)
    os.makedirs(f"{dev}/pts")
    os.makedirs(f"{dev}/shm")
    mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{link}")
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV)
    for path in ("run", "tmp"):
        os.makedirs(f"{root}/{path}", exist_ok=True)
        mount(
            "tmpfs",
            f"{root}/{path}",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            "mode=1777" if path == "tmp" else "mode=0755",
        )
    resolv = f"{root}/etc/resolv.conf"
    if os.path.isfile(resolv) and not os.path.islink(resolv) and os.path.isfile(HOST_RESOLV):
        # Scripts may reach the network: they see a copy of the host's
        # resolver config on this namespace's tmpfs. Whatever they write to
        # it changes neither the host's file nor the image's.
        copy = f"{root}/run/imagesmith-resolv.conf"
        shutil.copyfile(HOST_RESOLV, copy)
        mount(copy, resolv, None, MS_BIND)
    elif os.path.islink(resolv) and os.path.isfile(HOST_RESOLV):
        # systemd-resolved's stub link into /run: this namespace's fresh
        # tmpfs holds the copy there, and nothing outside /run is written.
        target = os.readlink(resolv)
        inside = os.path.normpath(target.lstrip("/") if target.startswith("/") else f"etc/{target}")
        if inside.startswith("run/") and ".." not in inside.split("/"):
            os.makedirs(os.path.dirname(f"{root}/{inside}"), exist_ok=True)
            shutil.copyfile(HOST_RESOLV, f"{root}/{inside}")
    for source, target, readonly in binds:
        path = f"{root}/{target.lstrip('/')}"
        if os.path.isdir(source):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        mount(source, path, None, MS_BIND | MS_REC)
        if readonly:
            mount("none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    root = options.pop(0)
    binds = []
    while options:
        flag, spec = options.pop(0), options.pop(0)
        source, target = spec.split(":", 1)
        binds.append((source, target, flag == "--ro-bind"))
    setup_root(root, binds)
    os.chroot(root)
    os.chdir("/")
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
