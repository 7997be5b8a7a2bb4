"""The remote stage cache against a real registry on loopback (tests/registry.py).

Small entries (a tiny tree through the real save, push and pull) prove the
protocol: digests checked, tampering refused, credentials kept out of argv.
The build tests then build the example `server` image on three "runners",
each with an empty local cache of its own:

- A builds it, runs mmdebstrap and pushes the stage;
- B takes the stage from the registry, runs no mmdebstrap, and its image
  holds the same packages and files as A's;
- C finds the stage's blob tampered with in the registry's storage: it
  refuses the entry, runs mmdebstrap and pushes a good entry again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagesmith import log
from imagesmith.build import build_image, plan_image_layout
from imagesmith.cache import initramfs as initramfs_cache
from imagesmith.cache import remote as remotecache
from imagesmith.cache import stages as stagecache
from imagesmith.cache.remote import RemoteCache, RemoteEntryError, finalize_remote
from imagesmith.config.space import load_config_space, resolve_image
from imagesmith.context import BuildContext
from imagesmith.errors import ConfigError
from imagesmith.stages.sharing import shareable_problems
from tests.conftest import EXAMPLES, empty_stage_cache, imagesmith
from tests.registry import Registry, running_registry
from tests.test_stage_cache_build import not_cached, tree_listing

KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def small_entry(cache_dir: Path, key: str = KEY) -> Path:
    """A real stage entry of a tiny tree, made by the stage cache's own save."""
    tree = cache_dir.parent / f"tree-{key}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("tiny\n")
    os.symlink("hostname", tree / "etc/name")
    return stagecache.save_tree(cache_dir, key, tree, {"image": "tiny", "inputs": {}})


def pushed_manifest(registry: Registry, repository: str, key: str) -> dict[str, Any]:
    """The entry's manifest, after `imagesmith cache list --remote` listed the key."""
    ref = registry.ref(repository)
    listed = imagesmith("cache", "list", "--remote", ref, "--cache-remote-insecure")
    assert listed.returncode == 0 and key in listed.stdout, listed.stdout + listed.stderr
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}:{key}"],
        capture_output=True,
        check=True,
    )
    data = json.loads(raw.stdout)
    assert isinstance(data, dict)
    return data


def flip_a_byte(path: Path) -> None:
    """Tamper with a blob in the registry's storage: one byte in its middle."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_finalize_remote_reads_flags_and_environment() -> None:
    assert finalize_remote(None, env={}) is None
    remote = finalize_remote(None, env={"IMAGESMITH_CACHE_REMOTE": "reg.test:5000/cache"})
    assert remote == RemoteCache("reg.test:5000/cache", push=True, tls_verify=True)
    env = {
        "IMAGESMITH_CACHE_REMOTE": "reg.test/a",
        "IMAGESMITH_CACHE_REMOTE_MODE": "pull",
        "IMAGESMITH_CACHE_REMOTE_INSECURE": "1",
    }
    assert finalize_remote("reg.test/b", env=env) == RemoteCache("reg.test/b", False, False)
    assert finalize_remote("reg.test/b", pull_only=True, env={}) == RemoteCache(
        "reg.test/b", False, True
    )
    for bad in ("docker://reg.test/a", "reg.test/a:tag", "reg.test", "Reg.test/A"):
        with pytest.raises(ConfigError):
            finalize_remote(bad, env={})
    with pytest.raises(ConfigError):
        finalize_remote("reg.test/a", env={"IMAGESMITH_CACHE_REMOTE_MODE": "push"})


def test_push_then_pull_gives_the_same_entry(registry: Registry, tmp_path: Path) -> None:
    remote = RemoteCache(registry.ref(), tls_verify=False)
    pusher = tmp_path / "a/cache"
    entry = small_entry(pusher)
    remotecache.push_entry(remote, pusher, KEY)
    manifest = pushed_manifest(registry, "imagesmith-cache", KEY)
    assert manifest["artifactType"] == remotecache.ARTIFACT_TYPE
    assert manifest["layers"][0]["mediaType"] == remotecache.TREE_MEDIA_TYPE

    puller = tmp_path / "b/cache"
    assert remotecache.pull_entry(remote, puller, KEY)
    pulled = stagecache.entry_dir(puller, KEY)
    tree = pulled / stagecache.TREE_FILE
    assert tree.read_bytes() == (entry / stagecache.TREE_FILE).read_bytes()
    info = json.loads((pulled / stagecache.ENTRY_FILE).read_text())
    assert info["key"] == KEY and info["tree_sha256"] == remotecache.sha256_file(tree)
    assert not remotecache.pull_entry(remote, tmp_path / "c/cache", "f" * 32), "a miss"
    # Nothing of the pull is left beside the entries.
    assert [p.name for p in stagecache.stages_dir(puller).iterdir()] == [KEY]


def test_two_pushes_of_one_key_at_once_leave_one_good_entry(
    registry: Registry, tmp_path: Path
) -> None:
    import concurrent.futures

    remote = RemoteCache(registry.ref("race"), tls_verify=False)
    key = "ab" * 16
    caches = [tmp_path / f"{n}/cache" for n in "xy"]
    for cache in caches:
        small_entry(cache, key)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: remotecache.push_entry(remote, c, key), caches))
    assert remotecache.pull_entry(remote, tmp_path / "z/cache", key)


def test_tampered_blob_is_refused(registry: Registry, tmp_path: Path) -> None:
    remote = RemoteCache(registry.ref("tamper"), tls_verify=False)
    small_entry(tmp_path / "a/cache")
    remotecache.push_entry(remote, tmp_path / "a/cache", KEY)
    manifest = pushed_manifest(registry, "tamper", KEY)
    flip_a_byte(registry.blob(manifest["layers"][0]["digest"]))
    puller = tmp_path / "b/cache"
    with pytest.raises(RemoteEntryError, match="digest"):
        remotecache.pull_entry(remote, puller, KEY)
    assert not stagecache.has_entry(puller, KEY)


def newc(files: dict[str, bytes]) -> bytes:
    """A newc cpio archive of `files`, as update-initramfs writes (uncompressed)."""
    out = b""
    for ino, (name, data) in enumerate([*files.items(), ("TRAILER!!!", b"")], 1):
        mode = 0 if name == "TRAILER!!!" else 0o100644
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return out


def initramfs_entry(cache_dir: Path, files: dict[str, bytes], key: str = KEY) -> Path:
    """A real initramfs cache entry (through its own save) of a tree whose
    /boot/initrd.img holds copies of the tree's `files`."""
    tree = cache_dir.parent / f"tree-{key}"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    (tree / "boot").mkdir(exist_ok=True)
    (tree / "boot/initrd.img").write_bytes(newc(files))
    assert initramfs_cache.save_initramfs(cache_dir, key, tree, "boot/initrd.img")
    return tree


def test_an_initramfs_entry_travels_under_its_own_tag(registry: Registry, tmp_path: Path) -> None:
    remote = RemoteCache(registry.ref("initramfs"), tls_verify=False)
    tree = initramfs_entry(tmp_path / "a/cache", {"usr/bin/busybox": b"busybox " * 100})
    remotecache.push_entry(remote, tmp_path / "a/cache", KEY, remotecache.INITRAMFS)
    listed = imagesmith("cache", "list", "--remote", remote.ref, "--cache-remote-insecure")
    assert f"{KEY}   initramfs" in listed.stdout, listed.stdout + listed.stderr

    assert not remotecache.pull_entry(remote, tmp_path / "b/cache", KEY), "not a stage entry"
    puller = tmp_path / "b/cache"
    assert remotecache.pull_entry(remote, puller, KEY, remotecache.INITRAMFS)
    (tree / "boot/initrd.img").unlink()
    assert initramfs_cache.reuse_initramfs(puller, KEY, tree, "boot/initrd.img")
    assert (tree / "boot/initrd.img").read_bytes() == newc({"usr/bin/busybox": b"busybox " * 100})
    # The tracked files came along: a changed binary still forces a rebuild.
    (tree / "usr/bin/busybox").write_bytes(b"another " * 100)
    assert not initramfs_cache.reuse_initramfs(puller, KEY, tree, "boot/initrd.img")


def server_context(tmp_path: Path) -> BuildContext:
    """A build context of the example server, everything under tmp_path."""
    image = resolve_image(load_config_space(EXAMPLES), "server")
    return BuildContext(
        image=image,
        workdir=tmp_path,
        output_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        layout=plan_image_layout(image),
    )


def test_an_initramfs_holding_a_key_or_a_secret_is_not_shareable(tmp_path: Path) -> None:
    ctx = server_context(tmp_path)
    ctx.secrets = [b"vendor-password-123"]
    pem = b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 64 + b"\n-----END PRIVATE KEY-----\n"
    files = {
        "etc/hostname": b"clean\n",
        "etc/dropbear/key.pem": pem,
        "etc/netrc": b"vendor-password-123",
    }
    initramfs_entry(ctx.cache_dir, files)
    assert shareable_problems(ctx, KEY, remotecache.INITRAMFS) == [
        "private-key: initramfs /etc/dropbear/key.pem: holds a PEM private key",
        "build-secret: initramfs /etc/netrc: holds a secret the build used",
    ]
    initramfs_entry(ctx.cache_dir, {"etc/hostname": b"clean\n"}, key="e" * 32)
    assert shareable_problems(ctx, "e" * 32, remotecache.INITRAMFS) == []


def test_credentials_from_the_environment_never_reach_argv(tmp_path: Path) -> None:
    password = "s3cret-registry-password"
    with running_registry(tmp_path / "reg", user="runner", password=password) as reg:
        remote = RemoteCache(reg.ref(), tls_verify=False)
        small_entry(tmp_path / "a/cache")
        with pytest.raises(Exception, match="unauthorized|authentication required"):
            remotecache.push_entry(remote, tmp_path / "a/cache", KEY)
        os.environ["IMAGESMITH_CACHE_REMOTE_USERNAME"] = "runner"
        os.environ["IMAGESMITH_CACHE_REMOTE_PASSWORD"] = password
        stderr = io.StringIO()
        log.set_verbose(True)
        try:
            with contextlib.redirect_stderr(stderr):
                remotecache.push_entry(remote, tmp_path / "a/cache", KEY)
                assert remotecache.pull_entry(remote, tmp_path / "b/cache", KEY)
        finally:
            log.set_verbose(False)
            del os.environ["IMAGESMITH_CACHE_REMOTE_USERNAME"]
            del os.environ["IMAGESMITH_CACHE_REMOTE_PASSWORD"]
        logged = stderr.getvalue()
        assert "skopeo copy" in logged and "--dest-authfile" in logged
        assert password not in logged


def test_a_tree_holding_a_build_secret_is_not_shareable(tmp_path: Path) -> None:
    ctx = server_context(tmp_path)
    secret = b"-----BEGIN PRIVATE KEY-----\nMIIclientkey\n-----END PRIVATE KEY-----\n"
    ctx.secrets = [secret]
    (ctx.tree / "etc/apt").mkdir(parents=True)
    (ctx.tree / "etc/hostname").write_text("clean\n")
    stagecache.save_tree(ctx.cache_dir, KEY, ctx.tree, {"image": "server", "inputs": {}})
    assert shareable_problems(ctx, KEY) == []
    (ctx.tree / "etc/apt/vendor-client.key").write_bytes(secret)
    (ctx.tree / "etc/apt/auth.conf").write_text("machine vendor.test login u password p\n")
    assert shareable_problems(ctx, KEY) == [
        "build-secret: /etc/apt/vendor-client.key: holds a secret the build used",
        "apt-auth: /etc/apt/auth.conf: apt credentials",
    ]


# --- real builds --------------------------------------------------------------


@dataclass
class Runner:
    ctx: BuildContext
    log: str
    listings: dict[str, dict[str, tuple[Any, ...]]]

    @property
    def manifest(self) -> dict[str, Any]:
        data = json.loads((self.ctx.output_dir / "server.manifest.json").read_text())
        assert isinstance(data, dict)
        return data

    @property
    def ran_mmdebstrap(self) -> bool:
        return "mmdebstrap --mode=root" in self.log


@pytest.fixture(scope="module")
def runners(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Runner]:
    assert os.geteuid() == 0, "the build tests run as root (make test under sudo)"
    base = tmp_path_factory.mktemp("remote-runners")
    space = base / "space"
    shutil.copytree(EXAMPLES, space, symlinks=True)
    toml = space / "imagesmith.toml"
    toml.write_text(toml.read_text().replace('outputs = ["raw", "qcow2"]', 'outputs = ["raw"]'))
    remote = finalize_remote(registry.ref("builds"), insecure=True)

    def build(label: str) -> Runner:
        listings: dict[str, dict[str, tuple[Any, ...]]] = {}

        def after(stage: str, ctx: BuildContext) -> None:
            if stage in ("bootstrap and packages", "finalise"):
                listings[stage] = tree_listing(ctx.tree)

        (base / label).mkdir()
        stderr = io.StringIO()
        log.set_verbose(True)
        try:
            with contextlib.redirect_stderr(stderr):
                ctx = build_image(
                    resolve_image(load_config_space(space), "server"),
                    output_dir=base / label / "out",
                    cache_dir=empty_stage_cache(base / label),
                    uuid_seed="remote-cache-test",
                    remote=remote,
                    after_stage=after,
                )
        finally:
            log.set_verbose(False)
            (base / f"{label}.log").write_text(stderr.getvalue())
        return Runner(ctx, stderr.getvalue(), listings)

    runners = {"A": build("A"), "B": build("B")}
    key = runners["A"].manifest["caches"]["stage_cache"]["key"]
    manifest = pushed_manifest(registry, "builds", key)
    flip_a_byte(registry.blob(manifest["layers"][0]["digest"]))
    runners["C"] = build("C")
    return runners


@pytest.mark.build
def test_runner_a_builds_and_pushes(runners: dict[str, Runner]) -> None:
    a = runners["A"]
    assert a.ran_mmdebstrap
    assert a.manifest["caches"]["stage_cache"]["hit"] is False
    assert a.manifest["caches"]["stage_cache"]["remote"] == "pushed"
    assert "remote cache miss: package stage" in a.log and "pushed package stage" in a.log
    assert a.manifest["caches"]["initramfs_cache"]["remote"] == "pushed"
    assert "pushed initramfs" in a.log


@pytest.mark.build
def test_runner_b_takes_the_stage_from_the_registry(runners: dict[str, Runner]) -> None:
    a, b = runners["A"], runners["B"]
    assert not b.ran_mmdebstrap
    assert "remote stage cache hit" in b.log and "mmdebstrap skipped" in b.log
    assert b.manifest["caches"]["stage_cache"] == {
        "key": a.manifest["caches"]["stage_cache"]["key"],
        "hit": True,
        "remote": "hit",
    }
    assert b.manifest["packages"] == a.manifest["packages"]
    made = {p: v for p, v in a.listings["bootstrap and packages"].items() if not not_cached(p)}
    assert b.listings["bootstrap and packages"] == made
    # The same files with the same contents, the initramfs included: B took
    # A's from the registry instead of running update-initramfs.
    assert b.manifest["caches"]["initramfs_cache"] == {
        "key": a.manifest["caches"]["initramfs_cache"]["key"],
        "hit": True,
        "remote": "hit",
    }
    assert "remote initramfs cache hit" in b.log and "update-initramfs -c" not in b.log
    assert b.listings["finalise"] == a.listings["finalise"]
    timings_a, timings_b = a.manifest["timings"], b.manifest["timings"]
    print(
        f"\npackage stage: cold {timings_a['bootstrap and packages']:.1f}s, "
        f"remote hit {timings_b['bootstrap and packages']:.1f}s; "
        f"build: cold {sum(timings_a.values()):.1f}s, remote hit {sum(timings_b.values()):.1f}s"
    )


@pytest.mark.build
def test_runner_c_refuses_a_tampered_entry_and_rebuilds(runners: dict[str, Runner]) -> None:
    a, c = runners["A"], runners["C"]
    assert "REFUSED remote package stage entry" in c.log and "digest" in c.log
    assert c.ran_mmdebstrap
    assert c.manifest["caches"]["stage_cache"] == {
        "key": a.manifest["caches"]["stage_cache"]["key"],
        "hit": False,
        "remote": "rejected; pushed",
    }
    assert c.manifest["packages"] == a.manifest["packages"]
    # The same initramfs key: the initramfs A pushed is good, and C takes it.
    assert c.manifest["caches"]["initramfs_cache"]["remote"] == "hit"


@pytest.mark.build
def test_plan_with_index_names_the_key_the_build_used(runners: dict[str, Runner]) -> None:
    space = runners["A"].ctx.image.config_space
    result = imagesmith("plan", "-C", space, "--index", "server")
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)["images"][0]
    assert entry["stage_key"] == runners["A"].manifest["caches"]["stage_cache"]["key"]
