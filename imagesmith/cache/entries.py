"""Cache entries: written atomically, locked per key, leftovers recognised.

An entry is a directory `KIND/KEY/` in the cache directory. It is written
under a temporary name beside it (`.tmp-KEY-TOKEN-PID`) and renamed into
place only when complete, so a reader never sees half an entry. A lock file
per key (`.tmp-KEY.lock`) serialises the builds that want the same entry.
A temporary directory whose process is gone is a leftover of an interrupted
build, which `imagesmith cache prune` removes.

Every entry carries `digest.json`: the size and SHA-256 of each of its files,
written when it is saved and checked before it is used. A disk that flipped
bits, a truncated copy or a hand-edited file makes the entry fail the check;
the build then says which entry and why, discards it and builds that part
again (`digest_problem()`, `discard()`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from imagesmith import log

TEMP_PREFIX = ".tmp-"
DIGEST_FILE = "digest.json"
# Files whose SHA-256 matched, with their stat when it did (`verified_since`).
VERIFIED_FILE = "verified.json"
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class CacheUse:
    """Which entry a build used, and whether it was there (for the manifest)."""

    key: str
    hit: bool
    # The remote stage cache's part, when one is set: "hit" (pulled), "pushed",
    # "missed" (a pull-only runner), "not asked" (the local cache had it), or
    # what went wrong, e.g. "rejected: ..." for an entry that failed a check.
    remote: str = ""


def private_kind_dir(kind_dir: Path) -> Path:
    """`kind_dir`, made if missing, readable by root only: entries hold whole
    image trees (shadow files, keys, set-user-ID programs of other
    releases), which no other user of the build host may read or run."""
    kind_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if kind_dir.stat().st_mode & 0o077:
        os.chmod(kind_dir, 0o700)
    return kind_dir


@contextlib.contextmanager
def _holding(path: Path, operation: int) -> Iterator[bool]:
    """`path` flock()ed with `operation` for the block: True, or False at
    once when LOCK_NB says another holds it. A lock file `forget_key`
    unlinked while this waited locks nothing any more: the file now at
    `path` is opened and locked instead, so two builds never hold one key
    through two files."""
    while True:
        with path.open("a") as lock:
            try:
                fcntl.flock(lock, operation)
            except BlockingIOError:
                yield False
                return
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue
            if os.path.samestat(os.fstat(lock.fileno()), now):
                yield True
                return


@contextlib.contextmanager
def locked(kind_dir: Path, key: str) -> Iterator[None]:
    """Hold the lock of `key` in `kind_dir` (made if missing) for the block."""
    private_kind_dir(kind_dir)
    with _holding(kind_dir / f"{TEMP_PREFIX}{key}.lock", fcntl.LOCK_EX):
        yield


@contextlib.contextmanager
def in_use(kind_dir: Path, key: str) -> Iterator[None]:
    """Share `key`'s entry for the block: any number of builds at once, while
    `remove_entry` (cache prune) waits for none of them and skips it."""
    private_kind_dir(kind_dir)
    with _holding(kind_dir / f"{TEMP_PREFIX}{key}.use", fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def forgettable(kind_dir: Path, key: str) -> Iterator[bool]:
    """True in the block when no build holds `key`'s lock or shares its
    entry, with both taken so that none can until the block ends; False at
    once otherwise (`cache prune` skips an entry a build is using). Inside
    a True block, `forget_key` may remove the key's lock files too."""
    nonblocking = fcntl.LOCK_EX | fcntl.LOCK_NB
    with _holding(kind_dir / f"{TEMP_PREFIX}{key}.lock", nonblocking) as got:
        if not got:
            yield False
            return
        with _holding(kind_dir / f"{TEMP_PREFIX}{key}.use", nonblocking) as unused:
            yield unused


def forget_key(kind_dir: Path, key: str) -> None:
    """Remove `key`'s lock files; only inside a `forgettable` block that said True."""
    for suffix in (".use", ".lock"):
        (kind_dir / f"{TEMP_PREFIX}{key}{suffix}").unlink(missing_ok=True)


def lock_keys(kind_dir: Path) -> set[str]:
    """The keys in `kind_dir` that have lock files, with or without an entry."""
    found = set()
    for path in kind_dir.glob(f"{TEMP_PREFIX}*") if kind_dir.is_dir() else []:
        if path.suffix in (".lock", ".use"):
            found.add(path.name[len(TEMP_PREFIX) : -len(path.suffix)])
    return found


def sync_filesystem(path: Path) -> None:
    """Write everything of the filesystem holding `path` to its disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_entry(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds, it becomes
    `final`. An entry another build stored first is kept, unless `replace`."""
    temp = final.with_name(f"{TEMP_PREFIX}{final.name}-{secrets.token_hex(4)}-{os.getpid()}")
    private_kind_dir(final.parent)
    temp.mkdir()
    try:
        yield temp
        if replace:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(temp, final)
        except OSError:  # another build stored the same key first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def leftovers(kind_dir: Path) -> list[Path]:
    """Temporary entries in `kind_dir` whose build process is gone."""
    found = []
    for path in kind_dir.glob(f"{TEMP_PREFIX}*") if kind_dir.is_dir() else []:
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            found.append(path)
    return found


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_digests(entry: Path, names: list[str], known: Mapping[str, str] | None = None) -> None:
    """Record the size and SHA-256 of `names` in the (temporary) entry; a
    SHA-256 in `known` (computed as the file was made) is not read again."""
    known = known or {}
    record = {
        name: {
            "size": (entry / name).stat().st_size,
            "sha256": known.get(name) or file_sha256(entry / name),
        }
        for name in names
    }
    (entry / DIGEST_FILE).write_text(json.dumps(record, indent=1) + "\n")


def recorded_digests(entry: Path) -> dict[str, tuple[int, str]]:
    """{file: (size, SHA-256)} as written when the entry was saved; raises
    OSError, ValueError, TypeError, KeyError or AttributeError for a
    digest.json that is missing or unreadable."""
    record = json.loads((entry / DIGEST_FILE).read_text())
    return {str(name): (int(d["size"]), str(d["sha256"])) for name, d in record.items()}


def digest_problem(entry: Path, known: Mapping[str, str] | None = None) -> str:
    """What is wrong with the entry's content, or "" when every file matches its digest.

    `known` gives SHA-256s already computed (a file hashed while it was
    being read for use); `known={}` checks the sizes only."""
    try:
        files = recorded_digests(entry)
    except FileNotFoundError:
        return f"no {DIGEST_FILE} (an entry from an older imagesmith, or a half-copied one)"
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"{DIGEST_FILE} is unreadable ({e})"
    if not files:
        return f"{DIGEST_FILE} lists no files"
    for name, (size, sha256) in sorted(files.items()):
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            what = "truncated" if actual < size else "grown"
            return f"{name} is {actual} bytes, {size} when saved ({what})"
        if known is not None and name not in known:
            continue
        if (known[name] if known is not None else file_sha256(path)) != sha256:
            return f"{name} does not match its SHA-256 (changed since it was saved)"
    return ""


def file_stamp(path: Path) -> list[int]:
    """What changes when anything writes the file: inode, size, mtime, ctime."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def verified_since(entry: Path, name: str) -> bool:
    """Whether the entry's file `name` matched its SHA-256 once and nothing
    has written it since (its stamp is unchanged): rehashing a desktop's
    cached 4 GB btrfs at every use takes a core for 4 s."""
    try:
        stamps = json.loads((entry / VERIFIED_FILE).read_text())
        return bool(stamps[name] == file_stamp(entry / name))
    except (OSError, ValueError, TypeError, KeyError):
        return False


def note_verified(entry: Path, name: str) -> None:
    """Record that `name` matched its SHA-256 as it stands (best effort)."""
    with contextlib.suppress(OSError):
        temp = entry / f"{TEMP_PREFIX}{VERIFIED_FILE}.{os.getpid()}.{threading.get_ident()}"
        temp.write_text(json.dumps({name: file_stamp(entry / name)}))
        os.replace(temp, entry / VERIFIED_FILE)


def discard(entry: Path, problem: str) -> None:
    """Say what is wrong with a cache entry and remove it; the caller rebuilds."""
    log.warn(f"cache entry {entry} is damaged: {problem}; discarded, building it again")
    shutil.rmtree(entry, ignore_errors=True)


def warn_not_saved(what: str, final: Path, reason: str) -> None:
    """A save failed: say so with the space left, and let the build go on."""
    try:
        free = f"{shutil.disk_usage(final.parent).free // 1024**2} MiB free there"
    except OSError:
        free = "its directory is unreadable"
    log.warn(f"could not save {what} to the cache ({final}; {free}): {reason}; going on without")
