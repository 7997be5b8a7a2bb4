"""Cache entries are checked before use, a failing save does not fail the
build, and `cache prune` leaves alone what a build holds.

Real small trees, the host's tar, and for a full disk a real tiny tmpfs.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagesmith.cache import admin as cacheadmin
from imagesmith.cache import entries, initramfs
from imagesmith.cache import stages as stagecache
from tests.test_initramfs_cache import KVER, newc
from tests.test_initramfs_cache import make_tree as make_initramfs_tree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners, mounts: root only")


def make_tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/sudo").write_bytes(b"\x7fELF sudo " * 30_000)  # 300 kB
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("stage\n")


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str = "64k") -> Iterator[Path]:
    """A real tmpfs of `size` at `where`: writes past it fail with ENOSPC."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)


def overwrite_middle(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\0" * 65536)


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 3)


def drop_digest(path: Path) -> None:
    (path.parent / entries.DIGEST_FILE).unlink()


@needs_root
@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (overwrite_middle, "root.tar does not match its SHA-256"),
        (truncate, "root.tar is 1"),  # "... bytes, N when saved (truncated)"
        (drop_digest, "no digest.json"),
    ],
)
def test_damaged_stage_entry_is_reported_discarded_and_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: object, said: str
) -> None:
    make_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    entry = stagecache.save_tree(cache, "k1", tmp_path / "tree", {})
    assert entry is not None
    damage(entry / stagecache.TREE_FILE)  # type: ignore[operator]
    restored = tmp_path / "restored"
    assert not stagecache.restore_tree(cache, "k1", restored)
    err = capsys.readouterr().err
    assert f"cache entry {entry} is damaged" in err and said in err, err
    assert "truncated" in err or damage is not truncate
    assert not entry.exists() and not restored.exists()  # mmdebstrap gets an empty target
    # The rebuild stores a good entry again, and it is used.
    assert stagecache.save_tree(cache, "k1", tmp_path / "tree", {}) == entry
    assert stagecache.restore_tree(cache, "k1", restored)
    assert (restored / "usr/bin/sudo").read_bytes() == (tmp_path / "tree/usr/bin/sudo").read_bytes()


@needs_root
def test_stage_entry_tar_cannot_read_is_discarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry whose digest matches a broken archive (saved broken) does not
    fail every later build: it is discarded and the stage rebuilds."""
    entry = stagecache.entry_dir(tmp_path / "cache", "k1")
    entry.mkdir(parents=True)
    (entry / stagecache.TREE_FILE).write_bytes(b"not a tar archive" * 1000)
    entries.write_digests(entry, [stagecache.TREE_FILE])
    restored = tmp_path / "restored"
    assert not stagecache.restore_tree(tmp_path / "cache", "k1", restored)
    err = capsys.readouterr().err
    assert "root.tar does not extract" in err and str(entry) in err
    assert not entry.exists() and not restored.exists()


@needs_root
def test_stage_save_on_a_full_disk_warns_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_tree(tmp_path / "tree")
    with tiny_filesystem(tmp_path / "cache") as cache:
        assert stagecache.save_tree(cache, "k1", tmp_path / "tree", {}) is None
        err = capsys.readouterr().err
        assert "warning: could not save the package stage to the cache" in err, err
        assert "MiB free there" in err and "going on without" in err
        assert not [p for p in (cache / "stages").iterdir() if not p.name.endswith(".lock")]


def saved_initramfs(tmp_path: Path) -> tuple[Path, Path, str]:
    """(cache, tree, target in the tree) with an initramfs entry "k" that fits the tree."""
    tree, cache = tmp_path / "tree", tmp_path / "cache"
    make_initramfs_tree(tree)
    (tree / "boot").mkdir()
    built = tree / "boot/built.img"
    built.write_bytes(gzip.compress(newc({"usr/bin/busybox": b"busybox binary" * 5000})))
    assert initramfs.save_initramfs(cache, "k", tree, "boot/built.img")
    return cache, tree, f"boot/initrd.img-{KVER}"


@pytest.mark.parametrize("damage", [truncate, overwrite_middle])
def test_damaged_initramfs_entry_is_not_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: object
) -> None:
    cache, tree, target = saved_initramfs(tmp_path)
    entry = initramfs.entry_dir(cache, "k")
    damage(entry / initramfs.IMAGE_FILE)  # type: ignore[operator]
    assert not initramfs.reuse_initramfs(cache, "k", tree, target)
    err = capsys.readouterr().err
    assert f"cache entry {entry} is damaged: initrd.img" in err, err
    assert not entry.exists() and not (tree / target).exists()


def test_initramfs_save_on_a_full_disk_warns_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "tree"
    make_initramfs_tree(tree)
    (tree / "boot").mkdir()
    (tree / "boot/built.img").write_bytes(os.urandom(256 * 1024))  # does not fit in 64k
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs")
    with tiny_filesystem(tmp_path / "cache") as cache:
        assert not initramfs.save_initramfs(cache, "k", tree, "boot/built.img")
        err = capsys.readouterr().err
        assert "warning: could not save the initramfs to the cache" in err, err
        assert not initramfs.entry_dir(cache, "k").exists()
        assert not entries.leftovers(cache / initramfs.INITRAMFS_DIR)


def test_prune_skips_an_entry_a_build_holds(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for kind, key in (("stages", "busy"), ("stages", "idle"), ("initramfs", "busy")):
        (cache / kind / key).mkdir(parents=True)
        (cache / kind / key / "data").write_bytes(b"x" * 1000)
    with stagecache.locked(cache, "busy"), initramfs.locked(cache, "busy"):
        removed = cacheadmin.prune(cache, everything=True)
        assert sorted((e.kind, e.name) for e in removed) == [("stage", "idle")]
        assert (cache / "stages/busy/data").is_file() and (cache / "initramfs/busy").is_dir()
    removed = cacheadmin.prune(cache, everything=True)
    assert sorted((e.kind, e.name) for e in removed) == [("initramfs", "busy"), ("stage", "busy")]


def lock_files(kind_dir: Path) -> list[str]:
    return sorted(p.name for p in kind_dir.glob(".tmp-*") if p.suffix in (".lock", ".use"))


def test_prune_removes_the_lock_files_of_what_it_removes_and_keeps_those_held(
    tmp_path: Path,
) -> None:
    """One lock file per key ever built or tried would pile up in the cache;
    prune takes those of the entries it removes, and of keys without an
    entry, but never one a build holds."""
    cache = tmp_path / "cache"
    stages = cache / "stages"
    for key in ("kept", "gone"):
        with stagecache.locked(cache, key), stagecache.in_use(cache, key):
            (stages / key).mkdir(parents=True)
    with stagecache.locked(cache, "never-saved"):
        pass
    assert len(lock_files(stages)) == 5
    hours_ago = time.time() - 7200
    os.utime(stages / "gone", (hours_ago, hours_ago))
    with stagecache.locked(cache, "being-built"):
        removed = cacheadmin.prune(cache, max_age=3600)
        assert [e.name for e in removed] == ["gone"]
        assert lock_files(stages) == [".tmp-being-built.lock", ".tmp-kept.lock", ".tmp-kept.use"]
    cacheadmin.prune(cache, everything=True)
    assert lock_files(stages) == []


def test_a_build_waiting_on_a_lock_prune_removes_holds_the_new_one(tmp_path: Path) -> None:
    """prune unlinks a key's lock file while it holds it; a build that was
    waiting on that file must not think it holds the key, while a later
    build takes a new file at the same path: the waiter moves to the new one."""
    kind_dir = tmp_path / "stages"
    kind_dir.mkdir()
    order: list[str] = []
    with entries.forgettable(kind_dir, "k") as got:
        assert got
        waiter = threading.Thread(target=hold_briefly, args=(kind_dir, order, "waiter"))
        waiter.start()
        time.sleep(0.3)  # the waiter has opened the old file and waits on it
        entries.forget_key(kind_dir, "k")
    waiter.join(timeout=10)
    with entries.forgettable(kind_dir, "k") as got:
        assert got  # the waiter let go of the file at the path, the one others lock
    assert order == ["waiter in", "waiter holds it"]
    assert lock_files(kind_dir) == [".tmp-k.lock", ".tmp-k.use"]


def hold_briefly(kind_dir: Path, order: list[str], name: str) -> None:
    with entries.locked(kind_dir, "k"):
        order.append(f"{name} in")
        with entries.forgettable(kind_dir, "k") as got:
            # Held through the file at its path, or prune could take it too.
            order.append(f"{name} {'is alone' if got else 'holds it'}")


def test_cached_trees_are_for_root_only(tmp_path: Path) -> None:
    """An entry holds a whole image: its shadow file, keys, and set-user-ID
    programs no other user of the build host may read or run."""
    cache = tmp_path / "cache"
    (cache / "stages").mkdir(parents=True, mode=0o755)
    with entries.new_entry(cache / "stages/k") as temp:
        (temp / "root.tar").write_bytes(b"x")
    with initramfs.locked(cache, "k"):
        pass
    for kind in ("stages", "initramfs"):
        assert (cache / kind).stat().st_mode & 0o777 == 0o700, kind


def test_prune_skips_a_stage_builds_have_mounted(tmp_path: Path) -> None:
    """A build whose tree is an overlay of the entry's unpacked tree shares
    it (any number of builds at once); prune leaves it until they are done."""
    cache = tmp_path / "cache"
    for key in ("shared", "idle"):
        (cache / "stages" / key / stagecache.UNPACKED_DIR).mkdir(parents=True)
    with stagecache.in_use(cache, "shared"), stagecache.in_use(cache, "shared"):
        removed = cacheadmin.prune(cache, everything=True)
        assert [e.name for e in removed] == ["idle"]
        assert (cache / "stages/shared" / stagecache.UNPACKED_DIR).is_dir()
    assert [e.name for e in cacheadmin.prune(cache, everything=True)] == ["shared"]


@needs_root
def test_deb_cache_hook_on_a_full_disk_does_not_fail_mmdebstrap(tmp_path: Path) -> None:
    from imagesmith.stages.bootstrap import ARCHIVES, cache_out_hook

    root = tmp_path / "root"
    archives = root / ARCHIVES.lstrip("/")
    archives.mkdir(parents=True)
    (archives / "small_1_all.deb").write_bytes(b"d" * 1000)
    (archives / "big_1_all.deb").write_bytes(os.urandom(256 * 1024))
    with tiny_filesystem(tmp_path / "debs") as cache:
        hook = subprocess.run(
            ["sh", "-c", cache_out_hook(str(cache)), "sh", str(root)],
            capture_output=True,
            text=True,
        )
        assert hook.returncode == 0, hook.stderr
        assert "could not save" in hook.stderr and "big_1_all.deb" in hook.stderr
        assert sorted(p.name for p in cache.iterdir()) == ["small_1_all.deb"]


def test_the_recommends_run_saves_the_debs_while_dpkg_installs(tmp_path: Path) -> None:
    """The hook downloads first, then the .debs go to the cache beside the
    install (here a stand-in `chroot` that sees them arrive), and the
    install's exit status is the hook's."""
    from imagesmith.stages.bootstrap import ARCHIVES, recommends_hook

    root, cache = tmp_path / "root", tmp_path / "debs"
    archives = root / ARCHIVES.lstrip("/")
    archives.mkdir(parents=True)
    cache.mkdir()
    seen = tmp_path / "seen"
    # The download "fetches" two .debs; the install waits until the cache
    # has both (it would hang, and time out, if the copy came after it).
    stand_in = f"""chroot() {{
        case "$*" in
        *--download-only*) echo a > "{archives}/a_1_all.deb"; echo b > "{archives}/b_1_all.deb";;
        *) while [ ! -e "{cache}/a_1_all.deb" ] || [ ! -e "{cache}/b_1_all.deb" ]; do sleep 0.1; done
           ls "{cache}" > "{seen}"; return 7;;
        esac
    }}
    """
    hook = subprocess.run(
        ["sh", "-c", stand_in + recommends_hook(("kde-plasma-desktop",), str(cache)), "sh", str(root)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert hook.returncode == 7, hook.stderr
    assert seen.read_text().split() == ["a_1_all.deb", "b_1_all.deb"]
    # Without a cache (mmdebstrap alone, in the benchmark): the install alone.
    assert "--download-only" not in recommends_hook(("kde-plasma-desktop",))
