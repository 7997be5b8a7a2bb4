"""The package-stage key, the index-state fetch, the cache entries and `imagesmith cache`.

Pure logic and small real files: which inputs change the key and which do
not, InRelease/Release fetched through real file:// URLs, entries saved and
restored with the real tar (owners, modes, xattrs, hard links, device
nodes), an interrupted save that leaves nothing visible, and the prune
policy.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagesmith.cache import admin as cacheadmin
from imagesmith.cache import index
from imagesmith.cache import stages as stagecache
from imagesmith.config.space import ResolvedImage, load_config_space, resolve_image
from imagesmith.errors import BuildError
from tests.conftest import imagesmith

MIRROR = "http://mirror.example/debian"
INDEX = {f"{MIRROR}/dists/trixie/InRelease": "a" * 64}


def resolved(space: Path, name: str = "server", **overrides: object) -> ResolvedImage:
    return resolve_image(load_config_space(space), name, overrides=dict(overrides))


def key_of(image: ResolvedImage, *, index: dict[str, str] = INDEX, tool: str = "t1") -> str:
    inputs = stagecache.stage_key_inputs(image, mirror=MIRROR, index_state=index, tool_version=tool)
    return stagecache.stage_key(inputs)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_key_is_stable_and_shared_by_images_with_the_same_packages(config_copy: Path) -> None:
    assert key_of(resolved(config_copy)) == key_of(resolved(config_copy))
    # server-btrfs differs only in later settings (filesystem, outputs).
    assert key_of(resolved(config_copy, "server-btrfs")) == key_of(resolved(config_copy))


@pytest.mark.parametrize(
    "change",
    [
        "class file",
        "class script",
        "fcopy file",
        "hostname",
        "size",
        "filesystem",
        "kernel_cmdline",
        "removed package",
        "package order",
    ],
)
def test_later_settings_do_not_change_the_key(config_copy: Path, change: str) -> None:
    before = key_of(resolved(config_copy))
    example = config_copy / "classes/example"
    toml = config_copy / "imagesmith.toml"
    if change == "class file":
        (example / "files/etc/motd").write_text("changed\n")
    elif change == "class script":
        edit(example / "scripts/10-customise", "\n", "\ntrue\n")
    elif change == "fcopy file":
        (example / "fcopy/etc/issue.net").write_text("changed\n")
    elif change == "hostname":
        edit(toml, "[images.server]\n", '[images.server]\nhostname = "other"\n')
    elif change == "size":
        edit(toml, 'size = "2GiB"\noutputs = ["raw", "qcow2"]', 'size = "3GiB"\noutputs = ["raw"]')
    elif change == "filesystem":
        edit(toml, "[images.server]\n", '[images.server]\nfilesystem = "btrfs"\n')
    elif change == "kernel_cmdline":
        edit(toml, "[images.server]\n", '[images.server]\nkernel_cmdline = ["quiet"]\n')
    elif change == "removed package":  # purged in the customise stage, after the cache
        edit(example / "class.toml", "[packages]", '[packages]\nremove = ["nano"]')
    elif change == "package order":
        edit(example / "class.toml", '["openssh-server", "less"]', '["less", "openssh-server"]')
    assert key_of(resolved(config_copy)) == before


def test_package_list_changes_the_key(config_copy: Path) -> None:
    before = key_of(resolved(config_copy))
    edit(config_copy / "classes/example/class.toml", '"less"]', '"less", "tree"]')
    assert key_of(resolved(config_copy)) != before


def test_debconf_changes_the_key(config_copy: Path) -> None:
    before = key_of(resolved(config_copy))
    (config_copy / "classes/example/debconf").write_text("tzdata tzdata/Areas select Europe\n")
    assert key_of(resolved(config_copy)) != before


def test_repository_and_its_key_file_change_the_key(config_copy: Path, tmp_path: Path) -> None:
    before = key_of(resolved(config_copy))
    keyring = tmp_path / "vendor.gpg"
    keyring.write_bytes(b"key one")
    edit(
        config_copy / "classes/example/class.toml",
        "[packages]",
        f'[[repositories]]\nname = "vendor"\nuri = "http://vendor.example/apt"\n'
        f'signed_by = "{keyring}"\n\n[packages]',
    )
    with_repo = key_of(resolved(config_copy))
    assert with_repo != before
    keyring.write_bytes(b"key two")
    assert key_of(resolved(config_copy)) != with_repo


@pytest.mark.parametrize("what", ["suite", "mirror", "components"])
def test_archive_settings_change_the_key(config_copy: Path, what: str) -> None:
    before = key_of(resolved(config_copy))
    value = {
        "suite": '"forky"',
        "mirror": '"http://other.example/debian"',
        "components": '["main", "contrib"]',
    }
    toml = config_copy / "imagesmith.toml"
    if what == "suite":
        edit(toml, 'suite = "trixie"', f"suite = {value[what]}")
    else:
        edit(toml, "[defaults]\n", f"[defaults]\n{what} = {value[what]}\n")
    image = resolved(config_copy)
    inputs = stagecache.stage_key_inputs(
        image, mirror=image.settings.mirror or MIRROR, index_state=INDEX, tool_version="t1"
    )
    assert stagecache.stage_key(inputs) != before


def test_index_state_and_tool_version_change_the_key(config_copy: Path) -> None:
    image = resolved(config_copy)
    newer = {k: "b" * 64 for k in INDEX}
    assert key_of(image, index=newer) != key_of(image)
    assert key_of(image, tool="t2") != key_of(image)


def test_index_urls() -> None:
    assert index.IndexSource("m", "http://a.example/debian/", "trixie").urls == (
        "http://a.example/debian/dists/trixie/InRelease",
        "http://a.example/debian/dists/trixie/Release",
    )
    assert index.IndexSource("flat", "http://a.example/repo", "./").urls == (
        "http://a.example/repo/InRelease",
        "http://a.example/repo/Release",
    )
    assert index.IndexSource("flat", "http://a.example/repo", "sub/").urls[0] == (
        "http://a.example/repo/sub/InRelease"
    )


def test_fetch_index_prefers_inrelease_then_release(tmp_path: Path) -> None:
    dists = tmp_path / "dists/trixie"
    dists.mkdir(parents=True)
    (dists / "Release").write_text("Suite: trixie\n")
    source = index.IndexSource("vendor", f"file://{tmp_path}", "trixie")
    only_release = index.fetch_index(source)
    (dists / "InRelease").write_text("signed Suite: trixie\n")
    assert index.fetch_index(source) != only_release
    state = index.fetch_index_state([source])
    assert state == {f"file://{tmp_path}/dists/trixie/InRelease": index.fetch_index(source)}


def test_fetch_index_failure_names_the_repository(tmp_path: Path) -> None:
    source = index.IndexSource("vendor", f"file://{tmp_path}/nothing", "trixie")
    with pytest.raises(
        BuildError, match=r"repository 'vendor' \(file://.*/nothing\) failed: .* trixie"
    ):
        index.fetch_index(source)
    unreachable = index.IndexSource("mirror", "http://127.0.0.1:9/debian", "trixie")
    started = time.monotonic()
    with pytest.raises(BuildError, match="repository 'mirror'"):
        index.fetch_index(unreachable, timeout=5)
    assert time.monotonic() - started < 5


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/secret").write_text("s")
    os.chown(root / "etc/secret", 1234, 5678)
    os.chmod(root / "etc/secret", 0o4750)
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF tool")
    os.link(root / "bin/tool", root / "bin/tool-link")
    os.setxattr(root / "bin/tool", "security.capability", b"\x01\x00\x00\x02" + b"\x00" * 16)
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink("../etc/secret", root / "bin/secret")
    (root / "var/cache/apt/archives").mkdir(parents=True)
    (root / "var/cache/apt/archives/big.deb").write_bytes(b"deb")


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and device nodes need root")
def test_entry_round_trip_keeps_owners_modes_xattrs_links_devices(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    entry = stagecache.save_tree(cache, "k1", tmp_path / "tree", {"image": "x"})
    assert entry is not None
    assert [p.name for p in (cache / "stages").iterdir() if not p.name.endswith(".lock")] == ["k1"]
    restored = tmp_path / "restored"
    assert stagecache.restore_tree(cache, "k1", restored)
    assert not stagecache.restore_tree(cache, "k2", tmp_path / "other")
    st = os.lstat(restored / "etc/secret")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4750)
    assert os.stat(restored / "bin/tool").st_ino == os.stat(restored / "bin/tool-link").st_ino
    assert os.getxattr(restored / "bin/tool", "security.capability").startswith(b"\x01\x00")
    dev = os.lstat(restored / "dev/null")
    assert stat.S_ISCHR(dev.st_mode) and os.major(dev.st_rdev) == 1 and os.minor(dev.st_rdev) == 3
    assert os.readlink(restored / "bin/secret") == "../etc/secret"
    # .debs live in the .deb cache, not in the entry.
    assert not (restored / "var/cache/apt/archives/big.deb").exists()
    assert (entry / "entry.json").is_file()


SLOW_SAVE = """
import sys
from pathlib import Path
from imagesmith.cache import index
from imagesmith.cache import stages as stagecache
stagecache.save_tree(Path(sys.argv[1]), "k1", Path(sys.argv[2]), {})
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="builds a tree with owners")
def test_interrupted_save_leaves_no_visible_entry(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    # Enough data that tar is still writing when the save is killed.
    with (tree / "big").open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 * 1024 * 1024))
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, cache, tree], start_new_session=True)
    deadline = time.monotonic() + 20
    while not list((cache / "stages").glob(".tmp-k1-*/root.tar")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / "stages/k1").exists()
    assert not stagecache.restore_tree(cache, "k1", tmp_path / "restored")
    assert cacheadmin.list_entries(cache) == []
    assert cacheadmin.leftovers(cache)  # the half entry, under its temporary name
    cacheadmin.prune(cache, max_age=1e9)
    assert not cacheadmin.leftovers(cache)


def fake_entry(cache: Path, kind: str, key: str, size: int, age: float) -> None:
    entry = cache / kind / key
    entry.mkdir(parents=True)
    (entry / "data").write_bytes(os.urandom(size))
    then = time.time() - age
    os.utime(entry, (then, then))


def test_prune_by_age_then_size_keeps_debs(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    day = 86400.0
    fake_entry(cache, "stages", "old", 100_000, 40 * day)
    fake_entry(cache, "stages", "middle", 100_000, 5 * day)
    fake_entry(cache, "initramfs", "recent", 100_000, 1 * day)
    (cache / "debs/trixie-amd64").mkdir(parents=True)
    (cache / "debs/trixie-amd64/a.deb").write_bytes(b"x" * 1000)
    removed = cacheadmin.prune(cache, max_age=30 * day)
    assert [e.name for e in removed] == ["old"]
    removed = cacheadmin.prune(cache, max_size=150_000)
    assert [e.name for e in removed] == ["middle"]  # least recently used first
    assert {e.name for e in cacheadmin.list_entries(cache)} == {"recent", "trixie-amd64"}
    cacheadmin.prune(cache, everything=True)
    assert cacheadmin.list_entries(cache) == []


def test_parse_age() -> None:
    assert cacheadmin.parse_age("30d") == 30 * 86400
    assert cacheadmin.parse_age("12h") == 12 * 3600
    assert cacheadmin.parse_age("2") == 2 * 86400


def test_cache_verb_lists_and_prunes(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fake_entry(cache, "stages", "0123abcd", 50_000, 3 * 86400)
    listed = imagesmith("cache", "--cache-dir", cache)
    assert listed.returncode == 0, listed.stderr
    assert "stage" in listed.stdout and "0123abcd" in listed.stdout and "3d" in listed.stdout
    refused = imagesmith("cache", "prune", "--cache-dir", cache)
    assert refused.returncode == 2 and "--max-age" in refused.stderr
    kept = imagesmith("cache", "prune", "--max-age", "7d", "--cache-dir", cache)
    assert kept.returncode == 0 and "removed 0 entries" in kept.stdout
    pruned = imagesmith("cache", "prune", "--max-age", "2d", "--cache-dir", cache)
    assert pruned.returncode == 0 and "removed 1 entries" in pruned.stdout
    assert not (cache / "stages/0123abcd").exists()


def test_parallel_builds_start_each_package_set_first(tmp_path: Path) -> None:
    """With -j N, a second package set runs its mmdebstrap while the images
    sharing the first one wait for theirs."""
    from imagesmith.build import package_stages_first
    from tests.test_config import make_space

    space = make_space(
        tmp_path,
        '[defaults]\nmirror = "http://mirror.example/debian"\n'
        '[images.a]\nclasses = ["base", "uefi"]\n'
        '[images.b]\nclasses = ["base", "bios"]\n'
        '[images.c]\nclasses = ["base", "uefi", "extra"]\n'
        '[images.d]\nclasses = ["base", "uefi", "extra"]\n',
        {"extra": '[packages]\ninstall = ["tree"]\n'},
    )
    loaded = load_config_space(space)
    images = [resolve_image(loaded, name) for name in "abcd"]
    assert [i.name for i in package_stages_first(images)] == ["a", "c", "b", "d"]


def test_a_stage_is_made_from_the_closest_parent_with_only_packages_added(tmp_path: Path) -> None:
    from imagesmith.cache import stages as stagecache

    base = {"suite": "trixie", "mirror": "http://mirror/debian", "tool": "t", "debconf": ""}

    def entry(key: str, packages: list[str], **changed: object) -> None:
        folder = tmp_path / "stages" / key
        folder.mkdir(parents=True)
        (folder / stagecache.TREE_FILE).write_bytes(b"tar")
        inputs = {**base, "packages": packages, "recommends": [], **changed}
        (folder / stagecache.ENTRY_FILE).write_text(json.dumps({"inputs": inputs}))

    entry("a" * 32, ["less", "ssh"])
    entry("b" * 32, ["less", "ssh", "tree"])  # the closest
    entry("c" * 32, ["less"], suite="bookworm")  # another suite
    entry("d" * 32, ["less", "ssh", "tree", "other"])  # not a subset
    entry("e" * 32, ["less", "ssh"], recommends=["ssh"])  # another Recommends choice
    wanted = {**base, "packages": ["less", "ssh", "tree", "vim"], "recommends": []}
    assert stagecache.parent_entry(tmp_path, wanted) == ("b" * 32, ["vim"])
    many = {**wanted, "packages": ["less", "ssh", *(f"p{i}" for i in range(9))]}
    assert stagecache.parent_entry(tmp_path, many) is None  # too many to add
    with_recommends = {**wanted, "recommends": ["vim"]}
    assert stagecache.parent_entry(tmp_path, with_recommends) is None
