"""Run commands inside an image root without touching the host's mounts.

`chroot_argv()` builds the argv that `run()` executes: `unshare` makes new
mount and PID namespaces, and `enter.py` mounts what a chroot needs
inside them. Mounts and processes die with the namespace, so Ctrl-C or a
crash never leaves anything mounted or running. `private_mounts_argv()` does
the same for tools that mount things themselves (mmdebstrap).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from imagesmith.host.run import run

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}


def private_mounts_argv(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """`argv` with mounts of its own, in a PID namespace: when unshare dies
    (with imagesmith, see run.py), the kernel kills everything `argv` started."""
    args = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]
    return [*args, "--mount-proc", *(os.fspath(a) for a in argv)]


def chroot_argv(
    root: Path,
    argv: Sequence[str | os.PathLike[str]],
    *,
    binds: Sequence[tuple[Path, str]] = (),
    ro_binds: Sequence[tuple[Path, str]] = (),
) -> list[str]:
    args = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    # -S: no site module. enter.py needs the standard library alone, found
    # through the PYTHONPATH run_in_root sets; site's start-up (the editable
    # install's finder, pathlib) was half of every chrooted command's 85 ms,
    # a dozen of which every build runs.
    args += [sys.executable, "-S", "-m", "imagesmith.host.enter", os.fspath(root)]
    for source, target in binds:
        args += ["--bind", f"{os.fspath(source)}:{target}"]
    for source, target in ro_binds:
        args += ["--ro-bind", f"{os.fspath(source)}:{target}"]
    return [*args, "--", *(os.fspath(a) for a in argv)]


def run_in_root(
    root: Path,
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    binds: Sequence[tuple[Path, str]] = (),
    ro_binds: Sequence[tuple[Path, str]] = (),
    input: bytes | None = None,
    capture: bool = False,
    what: str = "",
) -> bytes:
    """Run `argv` chrooted into `root`; returns stdout when `capture`."""
    full_env = {**BASE_ENV, **(env or {})}
    # `env -i` so nothing from the build host's environment leaks in.
    command = [
        "env",
        "-i",
        *(f"{k}={v}" for k, v in full_env.items()),
        *(os.fspath(a) for a in argv),
    ]
    result = run(
        chroot_argv(root, command, binds=binds, ro_binds=ro_binds),
        input=input,
        capture=capture,
        what=what or f"{os.fspath(argv[0])} in the image",
        env={"PYTHONPATH": str(Path(__file__).parent.parent.parent)},
    )
    return result.stdout


# Remount every mount read-only in a private mount namespace, show the one
# folder the command reads at /mnt/space (read-only), give it a private /tmp,
# then drop every capability: root in there can read the host but change
# nothing on it, not even by remounting.
READONLY_HOST_PRELUDE = (
    "set -e; mount --make-rprivate /; "
    'for m in $(findmnt -rno TARGET); do mount -o remount,bind,ro "$m" 2>/dev/null || true; done; '
    "mount -t tmpfs -o size=1m tmpfs /mnt; mkdir /mnt/space /mnt/tools; "
    'mount --bind "$1" /mnt/space; mount -o remount,bind,ro /mnt/space; '
    'mount --bind "$2" /mnt/tools; mount -o remount,bind,ro /mnt/tools; shift 2; '
    "mount -t tmpfs -o size=256m,mode=1777 tmpfs /tmp; "
    'exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs -- "$@"'
)
SANDBOX_SPACE = "/mnt/space"
# imagesmith's own helpers in the sandbox: where they are on the host may be
# under /tmp, which the sandbox covers with a tmpfs of its own.
SANDBOX_TOOLS = "/mnt/tools"


def readonly_host_argv(
    space: Path, tools: Path, argv: Sequence[str | os.PathLike[str]]
) -> list[str]:
    """argv that runs `argv` on the build host without letting it write there:
    new mount, UTS, IPC and PID namespaces, every mount read-only, `space` at
    SANDBOX_SPACE and `tools` at SANDBOX_TOOLS, a tmpfs on /tmp, no
    capabilities. For code from a config space that must run on the host
    (FAI's class/ scripts)."""
    return [
        "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
        "--mount-proc", "--", "bash", "-c", READONLY_HOST_PRELUDE, "imagesmith-sandbox",
        os.fspath(space), os.fspath(tools), *(os.fspath(a) for a in argv),
    ]  # fmt: skip
