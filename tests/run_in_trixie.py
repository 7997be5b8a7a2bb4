"""Run the unit tests (not build, not boot) under Debian trixie's Python 3.13.

`make test` runs this after the suite under the host's Python: Debian 13
ships Python 3.13, which removed modules 3.11 still has (`crypt`), so code
that passes here on the host can still fail on a trixie build host.

The first run makes a small trixie tree with mmdebstrap (python3, pytest and
the host tools the unit tests call) under CHROOT_PARENT, once per package
list, and later runs reuse it. The tree is written under a temporary name
and renamed into place, under a lock, so parallel runs from several clones
share one. The repository is bind-mounted at its own path inside a private
mount and PID namespace (`unshare`), so nothing outlives the run.

Usage: python tests/run_in_trixie.py [PYTEST ARGS...]   (as root)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagesmith.host.aptsources import host_debian_mirror  # noqa: E402

CHROOT_PARENT = Path(os.environ.get("IMAGESMITH_DEV_CACHE", "/var/cache/imagesmith-dev"))
SUITE = "trixie"
# python3 and pytest, and the host tools the unit tests run.
PACKAGES = (
    "python3", "python3-pytest", "zstd", "openssl", "fdisk", "e2fsprogs", "dosfstools",
    "mtools", "btrfs-progs", "qemu-utils", "mount", "util-linux", "procps", "mmdebstrap",
    # The registry and the firmware the remote-cache and Secure Boot unit tests use.
    "docker-registry", "skopeo", "ovmf",
)  # fmt: skip


def chroot_dir() -> Path:
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    return CHROOT_PARENT / f"python-{SUITE}-{key}"


def ensure_chroot() -> Path:
    """The cached trixie tree, made with mmdebstrap if it is not there yet."""
    final = chroot_dir()
    CHROOT_PARENT.mkdir(parents=True, exist_ok=True)
    with (CHROOT_PARENT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "usr/bin/python3").exists():
            return final
        temp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        shutil.rmtree(temp, ignore_errors=True)
        print(f"making a {SUITE} tree for the Python 3.13 tests in {final}", file=sys.stderr)
        try:
            subprocess.run(
                ["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(PACKAGES)}",
                 SUITE, str(temp), f"deb {host_debian_mirror()} {SUITE} main"],
                check=True,
            )  # fmt: skip
            os.rename(temp, final)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return final


def run_tests(root: Path, pytest_args: list[str]) -> int:
    """pytest inside `root`, with the repository at its own path."""
    repo = shlex.quote(str(REPO))
    inner = shlex.join([
        "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LC_ALL=C.UTF-8",
        f"PYTHONPATH={REPO}", "PYTHONDONTWRITEBYTECODE=1", "IMAGESMITH_CACHE_DIR=/tmp/cache",
        "python3", "-m", "pytest", "-p", "no:cacheprovider", "-m", "not build and not boot",
        *pytest_args,
    ])  # fmt: skip
    r = shlex.quote(str(root))
    script = (
        "set -e; mount --make-rprivate /; "
        # The root a mount of its own, as / is: unshare --propagation needs that.
        f"mount --bind {r} {r}; mount --rbind /dev {r}/dev; mount -t proc proc {r}/proc; mount --rbind /sys {r}/sys; "
        f"mount -t tmpfs -o mode=1777 tmpfs {r}/tmp; mkdir -p {r}{repo}; "
        f"mount --bind {repo} {r}{repo}; cp /etc/resolv.conf {r}/etc/resolv.conf; "
        f"exec chroot {r} sh -c {shlex.quote(f'cd {repo} && exec {inner}')}"
    )
    command = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", script]
    return subprocess.run(command).returncode


def main() -> int:
    if os.geteuid() != 0:
        print("run_in_trixie.py: needs root (mmdebstrap, unshare, chroot)", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        root = ensure_chroot()
        version = subprocess.run(
            ["chroot", str(root), "python3", "--version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"unit tests under {SUITE}'s {version}", file=sys.stderr)
        return run_tests(root, sys.argv[1:])
    return 130


if __name__ == "__main__":
    sys.exit(main())
