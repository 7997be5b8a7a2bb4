"""Real builds through the stage and initramfs caches.

One module fixture builds the example `server` image five times into a cache
of its own (the .debs come from the machine's shared .deb cache):

1. first build: mmdebstrap runs, the stage and the initramfs are stored;
2. one class file changed: the stage and the initramfs are reused;
3. the same, with the initramfs cache off: update-initramfs runs;
4. one package added: apt installs it on the first build's stage;
5. the same package set from mmdebstrap, to compare with.

The tree is listed (paths, types, owners, modes, xattrs, contents) after the
package stage and after finalise, so a reused stage is compared file by file
with what mmdebstrap produced. The `--all` test reads the session fixture.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagesmith import log
from imagesmith.build import build_image
from imagesmith.cache import initramfs
from imagesmith.config.space import load_config_space, resolve_image
from imagesmith.context import BuildContext
from tests.conftest import EXAMPLES, empty_stage_cache, imagesmith

pytestmark = [pytest.mark.build]


def not_cached(path: str) -> bool:
    """What a stage entry leaves out by design (stagecache.TAR_EXCLUDES)."""
    return fnmatch.fnmatch(f"./{path}", "./var/cache/apt/archives/*.deb") or fnmatch.fnmatch(
        f"./{path}", "./var/cache/apt/*.bin"
    )


def tree_listing(tree: Path) -> dict[str, tuple[Any, ...]]:
    listing: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = str(st.st_rdev)
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(os.listxattr(path)))
            listing[os.path.relpath(path, tree)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                content,
                xattrs,
            )
    return listing


@dataclass
class Build:
    ctx: BuildContext
    log: str
    listings: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    initrd: Path = Path()
    files: dict[str, str] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, Any]:
        data = json.loads((self.ctx.output_dir / "server.manifest.json").read_text())
        assert isinstance(data, dict)
        return data


@dataclass
class CacheBuilds:
    cache: Path
    builds: dict[str, Build]


KEPT_FILES = ("var/lib/dpkg/diversions", "usr/sbin/update-initramfs")


@pytest.fixture(scope="module")
def cache_builds(tmp_path_factory: pytest.TempPathFactory) -> CacheBuilds:
    assert os.geteuid() == 0, "the build tests run as root (make test under sudo)"
    base = tmp_path_factory.mktemp("stage-cache")
    space = base / "space"
    shutil.copytree(EXAMPLES, space, symlinks=True)
    toml = space / "imagesmith.toml"
    toml.write_text(toml.read_text().replace('outputs = ["raw", "qcow2"]', 'outputs = ["raw"]'))
    cache = empty_stage_cache(base)

    def build(label: str) -> Build:
        result = Build(ctx=None, log="")  # type: ignore[arg-type]

        def after(stage: str, ctx: BuildContext) -> None:
            if stage == "bootstrap and packages":
                result.listings["stage"] = tree_listing(ctx.tree)
            elif stage == "boot setup":
                result.initrd = base / f"{label}.initrd.img"
                shutil.copyfile(ctx.tree / f"boot/initrd.img-{ctx.kernel_version}", result.initrd)
            elif stage == "finalise":
                result.listings["final"] = tree_listing(ctx.tree)
                for rel in KEPT_FILES:
                    path = ctx.tree / rel
                    result.files[rel] = path.read_text(errors="replace") if path.exists() else ""

        stderr = io.StringIO()
        log.set_verbose(True)
        try:
            with contextlib.redirect_stderr(stderr):
                image = resolve_image(load_config_space(space), "server")
                result.ctx = build_image(
                    image,
                    output_dir=base / label,
                    cache_dir=cache,
                    uuid_seed="stage-cache-test",
                    after_stage=after,
                )
        finally:
            log.set_verbose(False)
            (base / f"{label}.log").write_text(stderr.getvalue())
        result.log = stderr.getvalue()
        return result

    builds = {"first": build("first")}
    motd = space / "classes/example/files/etc/motd"
    motd.write_text(motd.read_text() + "one changed line\n")
    builds["one-file"] = build("one-file")
    os.environ["IMAGESMITH_NO_INITRAMFS_CACHE"] = "1"
    try:
        builds["fresh-initramfs"] = build("fresh-initramfs")
    finally:
        del os.environ["IMAGESMITH_NO_INITRAMFS_CACHE"]
    class_toml = space / "classes/example/class.toml"
    class_toml.write_text(class_toml.read_text().replace('"less"]', '"less", "tree"]'))
    builds["new-package"] = build("new-package")  # made from the first build's stage
    # The same package set from mmdebstrap, for comparison.
    shutil.rmtree(cache / "stages" / builds["new-package"].manifest["caches"]["stage_cache"]["key"])
    os.environ["IMAGESMITH_DERIVED_STAGES"] = "0"
    try:
        builds["new-package-fresh"] = build("new-package-fresh")
    finally:
        del os.environ["IMAGESMITH_DERIVED_STAGES"]
    return CacheBuilds(cache, builds)


def ran_mmdebstrap(build: Build) -> bool:
    return "mmdebstrap --mode=root" in build.log


def stage_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "stages").iterdir() if not p.name.startswith("."))


def test_first_build_runs_mmdebstrap_and_stores_the_stage(cache_builds: CacheBuilds) -> None:
    first = cache_builds.builds["first"]
    assert ran_mmdebstrap(first)
    caches = first.manifest["caches"]
    assert caches["stage_cache"]["hit"] is False and caches["initramfs_cache"]["hit"] is False
    assert caches["stage_cache"]["key"] in stage_entries(cache_builds.cache)


def test_one_file_change_reuses_the_stage_tree_exactly(cache_builds: CacheBuilds) -> None:
    first, again = cache_builds.builds["first"], cache_builds.builds["one-file"]
    assert not ran_mmdebstrap(again)
    assert "mmdebstrap skipped" in again.log
    caches = again.manifest["caches"]
    assert caches["stage_cache"] == {
        "key": first.manifest["caches"]["stage_cache"]["key"],
        "hit": True,
    }
    assert caches["initramfs_cache"]["hit"] is True
    # The restored tree is what mmdebstrap made, file by file (owners, modes,
    # xattrs, contents), less the .debs and apt's binary caches.
    made = {p: v for p, v in first.listings["stage"].items() if not not_cached(p)}
    assert again.listings["stage"] == made
    # And the finished image differs from the first one only in the changed file.
    before, after = first.listings["final"], again.listings["final"]
    assert {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)} == {
        "etc/motd"
    }


def test_reused_initramfs_holds_what_a_fresh_one_holds(cache_builds: CacheBuilds) -> None:
    reused, fresh = cache_builds.builds["one-file"], cache_builds.builds["fresh-initramfs"]
    assert "update-initramfs skipped" in reused.log
    assert (
        "update-initramfs -c -k" in fresh.log and "initramfs_cache" not in fresh.manifest["caches"]
    )
    assert initramfs.cpio_files(reused.initrd) == initramfs.cpio_files(fresh.initrd)
    # initramfs-tools compressed it with zstd, as its config asks, instead of falling
    # back to gzip. (trixie's puts the already compressed modules in an uncompressed
    # cpio first; the compressed part follows its trailer.)
    data = fresh.initrd.read_bytes()
    rest = data[data.index(b"TRAILER!!!") + 10 :].lstrip(b"\0")
    assert rest[:4] == b"\x28\xb5\x2f\xfd"


def test_an_added_package_is_installed_on_the_cached_stage(cache_builds: CacheBuilds) -> None:
    """A new key whose package set only adds to a cached stage's: apt installs
    the added package on that tree, and the image is what mmdebstrap with
    the whole set makes, package for package and file for file."""
    first = cache_builds.builds["first"]
    added, fresh = cache_builds.builds["new-package"], cache_builds.builds["new-package-fresh"]
    assert not ran_mmdebstrap(added) and ran_mmdebstrap(fresh)
    parent = first.manifest["caches"]["stage_cache"]["key"]
    assert f"made from stage {parent}: installing 1 more: tree" in added.log
    caches = added.manifest["caches"]
    assert caches["stage_cache"]["hit"] is False
    assert caches["stage_cache"]["key"] == fresh.manifest["caches"]["stage_cache"]["key"]
    assert caches["initramfs_cache"]["hit"] is False  # the dpkg status changed
    assert added.manifest["packages"] == fresh.manifest["packages"]
    assert "usr/bin/tree" in added.listings["final"]
    before, after = fresh.listings["final"], added.listings["final"]
    differ = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert differ == [], differ


def test_build_time_measures_do_not_ship(cache_builds: CacheBuilds) -> None:
    """The update-initramfs divert, policy-rc.d and unsafe-io are gone from every image."""
    for build in cache_builds.builds.values():
        final = build.listings["final"]
        assert "usr/sbin/update-initramfs.distrib" not in final
        assert "update-initramfs" not in build.files["var/lib/dpkg/diversions"]
        assert "diverted by imagesmith" not in build.files["usr/sbin/update-initramfs"]
        assert "mkinitramfs" in build.files["usr/sbin/update-initramfs"]
        assert "usr/sbin/policy-rc.d" not in final
        leftovers = [p for p in final if "eatmydata" in p or "unsafe-io" in p]
        assert not leftovers
        assert not [
            p for p in final if p.startswith("var/cache/apt/archives/") and p.endswith(".deb")
        ]


def test_hygiene_scan_passes_on_an_image_from_the_caches(cache_builds: CacheBuilds) -> None:
    image = cache_builds.builds["one-file"].ctx.output_dir / "server.raw"
    result = imagesmith("verify", image)
    assert result.returncode == 0, result.stdout + result.stderr


def test_all_shares_one_stage_entry(built_examples: Path) -> None:
    """The session fixture builds with --all: server-btrfs reuses server's stage."""
    server = json.loads((built_examples / "server.manifest.json").read_text())
    btrfs = json.loads((built_examples / "server-btrfs.manifest.json").read_text())
    assert btrfs["caches"]["stage_cache"] == {
        "key": server["caches"]["stage_cache"]["key"],
        "hit": True,
    }
    log_text = (built_examples / "build.log").read_text()
    assert log_text.count("mmdebstrap skipped") >= 1
