"""Hostile inputs: class files, scripts, tarballs and images that try to reach
the build host. Each test plants canaries on the host and checks that they,
the host's resolver and machine-id, and everything outside the output and
cache directories come through untouched, and that nothing is left running
or mounted.

The unit tests drive the host-side code that writes into image trees
(host/paths.py and the stages that use it); the build tests run real builds
of the example config space with a hostile class added.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagesmith.build import plan_image_layout
from imagesmith.config.classes import load_class
from imagesmith.config.layout import MiB, UuidSource, plan_disk_layout
from imagesmith.config.space import load_config_space, resolve_image
from imagesmith.context import BuildContext
from imagesmith.disk.filesystems import make_esp, make_ext4
from imagesmith.disk.gpt import write_partition_table
from imagesmith.errors import BuildError, ConfigError
from imagesmith.host import paths
from imagesmith.host.run import hide_from_children, run
from imagesmith.stages.finalize import strip_build_state
from imagesmith.stages.outputs import staged_outputs
from tests.conftest import imagesmith

HOST_FILES = [Path(p) for p in ("/etc/resolv.conf", "/etc/machine-id", "/etc/hostname")]


def snapshot(*roots: Path) -> dict[str, object]:
    """Every path under `roots` with its type and content, and the host files."""
    seen: dict[str, object] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath, name)
                st = path.lstat()
                content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
                seen[str(path)] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, content)
    for host_file in HOST_FILES:
        seen[str(host_file)] = host_file.read_bytes() if host_file.exists() else None
    return seen


@pytest.fixture
def canary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A host directory the hostile inputs aim at, full of files worth keeping."""
    root = tmp_path_factory.mktemp("host-canary")
    for rel in ("machine-id", "hostname", "hosts", "fstab", "grub/grub.cfg", "shadow"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"canary {rel}\n")
    for rel in (
        "vartmp/keep",
        "tmp/keep",
        "sudoers.d/keep",
        "network/keep",
        "sources.d/imagesmith-x.list",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("keep\n")
    (root / "shadow").write_text("root:$1$salt$BSM4b6c3UpAtEoHVj7uIY0:20000:0:99999:7:::\n")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "a hostile input changed the build host"


# --- host/paths.py: every write resolves inside the tree ---------------------


def hostile_tree(tree: Path, canary: Path) -> Path:
    (tree / "etc/systemd").mkdir(parents=True)
    (tree / "var").mkdir()
    (tree / "boot").mkdir()
    (tree / "etc/apt").mkdir()
    links = {
        "etc/machine-id": "machine-id", "etc/hostname": "hostname", "etc/hosts": "hosts",
        "etc/fstab": "fstab", "var/tmp": "vartmp", "tmp": "tmp", "etc/sudoers.d": "sudoers.d",
        "etc/systemd/network": "network", "boot/grub": "grub", "etc/apt/sources.list.d": "sources.d",
    }  # fmt: skip
    for rel, target in links.items():
        os.symlink(canary / target, tree / rel)
    os.symlink("../../../../../../..", tree / "etc/up")  # relative, out of the tree
    return tree


def test_writes_into_a_hostile_tree_stay_in_it(tmp_path: Path, canary: Path) -> None:
    tree = hostile_tree(tmp_path / "tree", canary)
    for rel in ("etc/machine-id", "etc/hostname", "etc/hosts", "etc/fstab"):
        paths.write_in_root(tree, rel, "image\n")
        assert (tree / rel).read_text() == "image\n" and not (tree / rel).is_symlink()
    for rel in ("var/tmp", "tmp", "etc/apt/sources.list.d"):
        paths.empty_dir_in_root(tree, rel)
    paths.remove_in_root(tree, "etc/apt/sources.list.d/imagesmith-x.list")
    for rel in (
        "etc/sudoers.d/imagesmith-admin",
        "etc/systemd/network/10-x.network",
        "boot/grub/grub.cfg",
    ):
        # The directory is a symlink out of the tree: resolved inside the tree,
        # it does not exist, so the write fails cleanly instead of landing on the host.
        with pytest.raises(BuildError, match=f"cannot write /{rel}"):
            paths.write_in_root(tree, rel, "x")
    paths.write_in_root(tree, "etc/up/etc/escaped", "x")  # ".." stops at the tree's root
    assert (tree / "etc/escaped").read_text() == "x"
    assert paths.read_in_root(tree, "etc/up/shadow") is None


def test_finalise_on_a_hostile_tree_keeps_the_host(tmp_path: Path, canary: Path) -> None:
    space = tmp_path / "space"
    (space / "classes/mine").mkdir(parents=True)
    (space / "imagesmith.toml").write_text('[images.a]\nclasses = ["base", "uefi", "mine"]\n')
    image = resolve_image(load_config_space(space), "a")
    ctx = BuildContext(
        image=image, workdir=tmp_path / "work", output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache", layout=plan_image_layout(image),
    )  # fmt: skip
    hostile_tree(ctx.tree, canary)
    (ctx.tree / "etc/ssh").symlink_to(canary)
    (ctx.tree / "etc/resolv.conf").symlink_to("/etc/resolv.conf")
    strip_build_state(ctx)
    assert (ctx.tree / "etc/machine-id").read_text() == ""


def test_verify_refuses_a_tarball_that_writes_outside(tmp_path: Path, canary: Path) -> None:
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (
            ("etc/os-release", b"ID=debian\n"),
            (f"../../../../..{canary}/machine-id", b"x"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = imagesmith("verify", archive, timeout=120)
    assert result.returncode == 2 and "refused" in result.stderr, result.stderr


def test_verify_of_a_tarball_never_writes_through_its_own_symlink(
    tmp_path: Path, canary: Path
) -> None:
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("etc")
        link.type, link.linkname = tarfile.SYMTYPE, str(canary)
        tar.addfile(link)
        info = tarfile.TarInfo("etc/machine-id")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        node = tarfile.TarInfo("dev/sda")
        node.type, node.devmajor, node.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(node)
    result = imagesmith("verify", archive, timeout=120)
    assert result.returncode == 2 and "refused" in result.stderr, result.stderr


def test_verify_of_a_disk_image_never_reads_the_host(tmp_path: Path, canary: Path) -> None:
    """The image's /etc leads to a host directory with a known root password:
    the scan must judge the image (no shadow), not the host."""
    tree = tmp_path / "root"
    tree.mkdir()
    (tree / "etc").symlink_to(canary)
    layout = plan_disk_layout(
        size=300 * MiB, esp_size=64 * MiB, filesystem="ext4", architecture="amd64",
        uuids=UuidSource("hostile"),
    )  # fmt: skip
    disk = tmp_path / "disk.raw"
    write_partition_table(disk, layout)
    make_esp(disk, layout.esp, tmp_path / "no-esp-files")
    make_ext4(disk, layout.root, tree)
    result = imagesmith("verify", disk, timeout=120)
    assert "well-known" not in result.stdout, result.stdout
    assert "no root entry" in result.stdout


# --- config spaces that point out of themselves ------------------------------


def hostile_class(space: Path, canary: Path, entry: str) -> Path:
    cls = space / "classes/mine"
    cls.mkdir(parents=True)
    if entry == "debconf":
        (cls / "debconf").symlink_to(canary / "shadow")
    elif entry == "class.toml":
        (cls / "class.toml").symlink_to(canary / "shadow")
    elif entry == "debs":
        (cls / "debs").mkdir()
        (cls / "debs/x.deb").symlink_to(canary / "shadow")
    elif entry == "signed_by":
        (space / "keys").mkdir()
        (space / "keys/vendor.asc").symlink_to(canary / "shadow")
        (cls / "class.toml").write_text(
            '[[repositories]]\nname = "v"\nuri = "http://127.0.0.1/v"\nsigned_by = "keys/vendor.asc"\n'
        )
    return cls


@pytest.mark.parametrize("entry", ["debconf", "class.toml", "debs", "signed_by"])
def test_class_files_never_lead_out_of_the_config_space(
    tmp_path: Path, canary: Path, entry: str
) -> None:
    space = tmp_path / "space"
    cls = hostile_class(space, canary, entry)
    with pytest.raises(ConfigError) as e:
        load_class(cls, builtin=False)
    assert "leads out of the config space" in e.value.message
    assert "canary" not in e.value.message.split("leads out")[1].split("\n")[0].replace(
        str(space), ""
    )
    assert "$1$salt" not in str(e.value)


def test_relative_key_paths_are_found_from_anywhere(tmp_path: Path) -> None:
    space = tmp_path / "space"
    (space / "keys").mkdir(parents=True)
    (space / "keys/vendor.asc").write_text("key\n")
    cls = space / "classes/mine"
    cls.mkdir(parents=True)
    (cls / "class.toml").write_text(
        '[[repositories]]\nname = "v"\nuri = "http://127.0.0.1/v"\nsigned_by = "keys/vendor.asc"\n'
    )
    os.chdir("/")
    assert load_class(cls, builtin=False).repositories[0]["signed_by"] == str(
        space / "keys/vendor.asc"
    )


@pytest.mark.parametrize("name", ["../escape", "a'b", 'x"y', ".hidden", "a/b"])
def test_image_names_that_would_escape_or_break_grub_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "imagesmith.toml").write_text(
        f'[images."{name}"]\nclasses = ["base"]\n'.replace('"x"y"', "'x\"y'")
    )
    with pytest.raises(ConfigError, match="not a valid image name"):
        load_config_space(tmp_path)


def test_repository_names_that_would_escape_are_refused(tmp_path: Path) -> None:
    cls = tmp_path / "space/classes/mine"
    cls.mkdir(parents=True)
    (cls / "class.toml").write_text(
        '[[repositories]]\nname = "../../x"\nuri = "http://127.0.0.1/v"\n'
    )
    with pytest.raises(ConfigError, match="not a valid repository name"):
        load_class(cls, builtin=False)


# --- outputs, secrets ------------------------------------------------------------


def test_outputs_are_staged_where_nobody_can_plant_a_symlink(tmp_path: Path, canary: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o1777)
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old predictable names
        (out / f".imagesmith-tmp-{pid}-a.raw").symlink_to(canary / "machine-id")

    class Ctx:
        output_dir = out

        class image:  # noqa: N801
            name = "a"

    with staged_outputs(Ctx) as staged:  # type: ignore[arg-type]
        assert stat.S_IMODE(staged.directory.stat().st_mode) == 0o700
        staged.add(out, "a", "raw").write_bytes(b"disk")
    assert (out / "a.raw").read_bytes() == b"disk"
    assert not [p for p in out.iterdir() if p.is_dir()]


def test_an_env_secret_never_reaches_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGESMITH_TEST_SECRET", "hunter2")
    assert b"hunter2" in run(["env"], capture=True).stdout
    hide_from_children("IMAGESMITH_TEST_SECRET")
    assert b"hunter2" not in run(["env"], capture=True).stdout


def test_the_manifest_keeps_no_digest_a_guess_can_be_tested_against() -> None:
    from imagesmith.inspect.verify import secret_digest

    assert secret_digest(b"hunter2", b"k1") != secret_digest(b"hunter2", b"k2")
    assert secret_digest(b"hunter2", b"k1") != hashlib.sha256(b"hunter2").hexdigest()


# --- real builds with a hostile class --------------------------------------------

HOSTILE_SCRIPT = """#!/bin/sh
set -e
# Everything the build writes from the host after the scripts, pointed at the host.
rm -rf /var/tmp && ln -s {canary}/vartmp /var/tmp
umount /tmp && rmdir /tmp && ln -s {canary}/tmp /tmp
rm -f /etc/machine-id && ln -s {canary}/machine-id /etc/machine-id
rm -f /etc/fstab && ln -s {canary}/fstab /etc/fstab
rm -rf /etc/apt/sources.list.d && ln -s {canary}/sources.d /etc/apt/sources.list.d
# A regular resolv.conf: the next script's chroot gets the host's resolver there.
rm -f /etc/resolv.conf && echo "nameserver 192.0.2.1" > /etc/resolv.conf
"""
REWRITE_RESOLVER = """#!/bin/sh
set -e
echo "nameserver 203.0.113.66" > /etc/resolv.conf
"""


def leftovers(log: str) -> list[str]:
    """What the build whose log this is left: its work directory, mounts or
    processes under it (other builds on the machine are not its business)."""
    match = re.search(r"work in (\S+)", log)
    assert match, log
    workdir = match.group(1)
    found = [workdir] if Path(workdir).exists() else []
    found += [line for line in Path("/proc/mounts").read_text().splitlines() if workdir in line]
    ps = subprocess.run(["pgrep", "-af", workdir], capture_output=True, text=True).stdout
    return found + ps.splitlines()


def build_hostile(
    config_copy: Path, tmp_path: Path, canary: Path
) -> subprocess.CompletedProcess[str]:
    cls = config_copy / "classes/hostile"
    (cls / "scripts").mkdir(parents=True)
    for name, text in (
        ("10-plant", HOSTILE_SCRIPT.format(canary=canary)),
        ("20-resolver", REWRITE_RESOLVER),
    ):
        (cls / "scripts" / name).write_text(text)
        (cls / "scripts" / name).chmod(0o755)
    toml = config_copy / "imagesmith.toml"
    toml.write_text(
        toml.read_text().replace('"uefi", "example"]', '"uefi", "example", "hostile"]', 1)
    )
    return imagesmith("build", "-C", config_copy, "-o", tmp_path / "out", "server", timeout=1200)


@pytest.mark.build
def test_a_hostile_build_leaves_the_host_untouched(
    config_copy: Path, tmp_path: Path, canary: Path
) -> None:
    result = build_hostile(config_copy, tmp_path, canary)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not leftovers(result.stderr)
    listing = imagesmith("verify", tmp_path / "out/server.raw", timeout=300)
    assert listing.returncode == 0, listing.stdout + listing.stderr


@pytest.mark.build
def test_class_files_that_are_symlinks_to_the_host_fail_cleanly(
    config_copy: Path, tmp_path: Path, canary: Path
) -> None:
    files = config_copy / "classes/example/files/etc"
    (files / "hostname").symlink_to(canary / "hostname")
    (files / "systemd").mkdir(exist_ok=True)
    (files / "systemd/network").symlink_to(canary / "network")
    result = imagesmith("build", "-C", config_copy, "-o", tmp_path / "out", "server", timeout=1200)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "cannot write /etc/systemd/network/" in result.stderr
    assert not leftovers(result.stderr)
    assert not (tmp_path / "out/server.raw").exists()
