"""The initramfs, built once per build and reused across builds when nothing it holds changed.

`update-initramfs` costs seconds on every build, yet a one-file change to a
class rarely touches anything the initramfs holds. A built initramfs is kept
in the cache (`initramfs/KEY/`) with two kinds of proof that it still fits a
new tree:

1. The key hashes what decides *which* files go in and how: the kernel
   version, the dpkg status (every package and version, so every hook,
   binary, library, module and udev rule that packages ship), the
   configuration initramfs-tools and its hooks read (`CONFIG_PATHS`, for
   example /etc/initramfs-tools, /etc/modprobe.d, /etc/udev), the module
   indexes of that kernel and the /etc/fstab entries without their device
   names (the fsck hook reads the root filesystem type).
2. `tracked.json` lists every file of the initramfs that is a copy of a file
   in the tree, with its hash. Reuse also requires each of those tree files to
   be unchanged, so a class that replaces a binary, a library or a rule the
   initramfs copies forces a rebuild.

A cached initramfs is used only when both hold, and when the entry's files
still match the digest written when it was saved (`entries.digest_problem()`:
a damaged entry is reported and discarded). Anything else builds it with
the image's own `update-initramfs`, as a build without a cache would. Builds
hold the key's lock (`locked()`) from the lookup to the save, so under `-j N`
one image builds the initramfs, another with the same key waits and reuses
it, and no save replaces an entry while another build copies it. A save that
fails (a full disk) warns, and the build goes on. The one
thing this cannot see is a hook that *generates* content from a file outside
`CONFIG_PATHS`; such a config space sets `IMAGESMITH_NO_INITRAMFS_CACHE=1`.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from imagesmith.cache import entries
from imagesmith.errors import BuildError
from imagesmith.host.paths import copy_into_root, read_in_root, resolve_in_root
from imagesmith.host.run import run

CACHE_VERSION = "2"  # 2: entries carry digest.json
INITRAMFS_DIR = "initramfs"
IMAGE_FILE = "initrd.img"
TRACKED_FILE = "tracked.json"
CONFIG_PATHS = (
    "etc/initramfs-tools", "usr/share/initramfs-tools", "etc/initramfs",
    "etc/modprobe.d", "usr/lib/modprobe.d", "etc/udev", "etc/systemd/network",
    "etc/crypttab", "etc/cryptsetup-initramfs", "etc/mdadm", "etc/lvm", "etc/fstab.d",
    "etc/default/keyboard", "etc/default/console-setup", "etc/console-setup",
    "etc/ld.so.conf", "etc/ld.so.conf.d", "etc/kernel-img.conf",
)  # fmt: skip


def initramfs_disabled() -> bool:
    return os.environ.get("IMAGESMITH_NO_INITRAMFS_CACHE", "") not in ("", "0")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_path(tree: Path, rel: str, digest: hashlib._Hash) -> None:
    """Feed names, types, modes and contents under tree/rel into `digest`."""
    top = tree / rel
    if not top.exists() and not top.is_symlink():
        return
    entries = [top] if not top.is_dir() or top.is_symlink() else sorted(_walk(top))
    for path in entries:
        st = path.lstat()
        digest.update(f"{path.relative_to(tree)}\0{st.st_mode:o}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            digest.update(os.readlink(path).encode())
        elif stat.S_ISREG(st.st_mode):
            digest.update(path.read_bytes())
        digest.update(b"\n")


def _walk(top: Path) -> Iterator[Path]:
    yield top
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            yield Path(dirpath, name)


def fstab_shape(tree: Path) -> str:
    """/etc/fstab without the device field: what the fsck hook reads, minus the UUIDs."""
    fstab = tree / "etc/fstab"
    if not fstab.is_file():
        return ""
    rows = []
    for line in fstab.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            rows.append(" ".join(words[1:]))
    return "\n".join(rows)


def initramfs_key(tree: Path, kernel_version: str) -> str:
    digest = hashlib.sha256(f"imagesmith initramfs {CACHE_VERSION}\0{kernel_version}\0".encode())
    digest.update((tree / "var/lib/dpkg/status").read_bytes())
    digest.update(fstab_shape(tree).encode())
    for rel in CONFIG_PATHS:
        hash_path(tree, rel, digest)
    modules = resolve_in_root(tree, f"usr/lib/modules/{kernel_version}")
    if modules is not None:
        for path in sorted(_walk(modules)):
            st = path.lstat()
            # A directory's size is the filesystem's business (tmpfs and ext4
            # differ): only files' sizes, or the key differs by work directory.
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            digest.update(f"{path.relative_to(modules)}\0{st.st_mode:o}\0{size}\n".encode())
        for index in sorted(modules.glob("modules.*")):
            digest.update(index.read_bytes())
    return digest.hexdigest()[:32]


def cpio_files(image: Path) -> dict[str, bytes]:
    """{path: content} of every regular file in an initramfs (early cpio + compressed main)."""
    data = image.read_bytes()
    files: dict[str, bytes] = {}
    while data:
        if data.startswith(b"070701"):
            data = _read_newc(data, files)
            data = data.lstrip(b"\0")
        else:
            data = _decompress(data)
            data = _read_newc(data, files).lstrip(b"\0") if data.startswith(b"070701") else b""
    return files


def _read_newc(data: bytes, files: dict[str, bytes]) -> bytes:
    pos = 0
    while True:
        header = data[pos : pos + 110]
        if len(header) < 110 or header[:6] != b"070701":
            raise ValueError("not a newc cpio archive")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode(errors="replace")
        start = (name_end + 3) & ~3
        end = start + size
        if name == "TRAILER!!!":
            return data[end:]
        if stat.S_ISREG(mode):
            files[name.lstrip("./")] = data[start:end]
        pos = (end + 3) & ~3


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return run(["zstd", "-dcq"], input=data, capture=True, what="zstd -d (initramfs)").stdout
    raise ValueError("unknown initramfs compression")


def tracked_files(tree: Path, image: Path) -> dict[str, str]:
    """{tree path: sha256} of the files the initramfs holds verbatim copies of."""
    tracked = {}
    for name, content in cpio_files(image).items():
        source = resolve_in_root(tree, name)
        if source is None or not source.is_file() or source.stat().st_size != len(content):
            continue
        digest = sha256_bytes(content)
        if sha256_bytes(source.read_bytes()) == digest:
            tracked[str(source.relative_to(tree))] = digest
    return tracked


def still_matches(tree: Path, tracked: dict[str, str]) -> bool:
    for rel, digest in tracked.items():
        data = read_in_root(tree, rel)
        if data is None or sha256_bytes(data) != digest:
            return False
    return True


def entry_dir(cache_dir: Path, key: str) -> Path:
    return cache_dir / INITRAMFS_DIR / key


def locked(cache_dir: Path, key: str) -> contextlib.AbstractContextManager[None]:
    """Hold the key's lock around reuse, build and save."""
    return entries.locked(cache_dir / INITRAMFS_DIR, key)


def reuse_initramfs(cache_dir: Path, key: str, tree: Path, target: str) -> bool:
    """Copy the cached initramfs to `target` (a path in the tree) when it fits
    this tree; False otherwise. A damaged entry is discarded with a warning.
    Hold `locked()`."""
    entry = entry_dir(cache_dir, key)
    if not entry.is_dir():
        return False
    problem = entries.digest_problem(entry)
    try:
        tracked = json.loads((entry / TRACKED_FILE).read_text()) if not problem else {}
    except (OSError, ValueError) as e:
        problem = f"{TRACKED_FILE} is unreadable ({e})"
    if problem:
        entries.discard(entry, problem)
        return False
    if not still_matches(tree, tracked):
        return False
    copy_into_root(entry / IMAGE_FILE, tree, target)
    os.utime(entry)  # last used, for pruning
    return True


def save_initramfs(cache_dir: Path, key: str, tree: Path, image: str) -> bool:
    """Store a freshly built initramfs (a path in the tree) and the tree files
    it copied, atomically. False, with a warning, when it could not be saved.
    Hold `locked()`."""
    data = read_in_root(tree, image)
    if data is None:
        raise BuildError(f"update-initramfs made no /{image}")
    final = entry_dir(cache_dir, key)
    try:
        with entries.new_entry(final, replace=True) as temp:
            # replace: a stale entry whose tracked files changed gives way.
            (temp / IMAGE_FILE).write_bytes(data)
            tracked = tracked_files(tree, temp / IMAGE_FILE)
            (temp / TRACKED_FILE).write_text(json.dumps(tracked, indent=1) + "\n")
            entries.write_digests(temp, [IMAGE_FILE, TRACKED_FILE])
    except (BuildError, OSError, ValueError) as e:
        entries.warn_not_saved("the initramfs", final, str(e))
        return False
    return True
