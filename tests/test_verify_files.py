"""`imagesmith verify` on every output format imagesmith writes, and on files
that are not images: each answer names the file the user gave.

The images are small trees made here, written with the build's own code (GPT,
ext4, the OCI archive writer) and the host's zstd, then scanned by the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagesmith.config.space import load_config_space, resolve_image
from imagesmith.formats import manifest_for
from imagesmith.formats.oci import write_oci_archive
from tests.conftest import EXAMPLES
from tests.test_verify import DIRTY, clean_tree, disk_image, tarball, verify


def findings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return sorted(line.split(":")[0] for line in result.stdout.splitlines())


def test_raw_zst_is_decompressed_and_scanned(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path / "root")
    DIRTY["ssh-host-keys"](tree)
    raw = disk_image(tree, tmp_path, "ext4")
    zst = tmp_path / "server.raw.zst"
    subprocess.run(["zstd", "-q", "-o", str(zst), str(raw)], check=True)
    result = verify(zst)
    assert result.returncode == 1, result.stderr
    assert findings(result) == ["ssh-host-keys"]


def test_oci_archive_is_read_through_its_layer(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path / "root")
    rootfs = tarball(tree, tmp_path / "container.rootfs.tar")
    image = resolve_image(load_config_space(EXAMPLES), "container")
    oci = tmp_path / "container.oci.tar"
    write_oci_archive(image, rootfs, oci, scratch=tmp_path)
    clean = verify(oci)
    assert clean.returncode == 0, clean.stdout + clean.stderr  # no false root-password
    DIRTY["machine-id"](tree)
    write_oci_archive(image, tarball(tree, rootfs), oci, scratch=tmp_path)
    dirty = verify(oci)
    assert dirty.returncode == 1 and findings(dirty) == ["machine-id"], dirty.stdout


def test_every_output_finds_its_manifest() -> None:
    for name in ("server.raw", "server.raw.zst", "server.qcow2", "c.oci.tar", "c.rootfs.tar"):
        stem = name.split(".")[0]
        assert manifest_for(Path("out", name)) == Path("out", f"{stem}.manifest.json")


def test_truncated_disk_is_named_and_explained(tmp_path: Path) -> None:
    raw = disk_image(clean_tree(tmp_path / "root"), tmp_path, "ext4")
    truncated = tmp_path / "server.raw"
    raw.rename(truncated)
    os.truncate(truncated, truncated.stat().st_size // 2)
    result = verify(truncated)
    assert result.returncode == 2, result.stderr
    assert f"{truncated}: truncated: the disk is" in result.stderr
    assert "root.img" not in result.stderr


def test_truncated_tar_and_zst_are_named(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path / "root")
    (tree / "usr/big").write_bytes(os.urandom(1024 * 1024))
    tar = tarball(tree, tmp_path / "c.rootfs.tar")
    os.truncate(tar, tar.stat().st_size // 2)
    result = verify(tar)
    assert result.returncode == 2
    assert f"{tar}: the tar archive cannot be read to the end" in result.stderr
    raw = disk_image(clean_tree(tmp_path / "root2"), tmp_path, "ext4")
    zst = tmp_path / "server.raw.zst"
    subprocess.run(["zstd", "-q", "-o", str(zst), str(raw)], check=True)
    os.truncate(zst, zst.stat().st_size // 2)
    result = verify(zst)
    assert result.returncode == 2
    assert f"{zst}: cannot be decompressed" in result.stderr
    qcow2 = tmp_path / "server.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    os.truncate(qcow2, qcow2.stat().st_size // 2)
    result = verify(qcow2)
    assert result.returncode == 2, result.stderr
    assert f"{qcow2}: the qcow2 image is damaged or truncated" in result.stderr


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes), not an image"),
        (lambda p: p.mkdir(), "is a directory, not an image file"),
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(os.urandom(4096)), "no partition table: not a disk image"),
    ],
    ids=["empty", "directory", "missing", "garbage"],
)
def test_not_an_image_says_what_is_wrong(tmp_path: Path, make: object, said: str) -> None:
    path = tmp_path / "server.raw"
    make(path)  # type: ignore[operator]
    result = verify(path)
    assert result.returncode == 2, result.stderr
    assert f"{path}: {said}" in result.stderr
    assert "Traceback" not in result.stderr


NO_CRYPT_MODULE = """
import sys
sys.modules["crypt"] = None  # as on Python 3.13, where the module is gone
from imagesmith.inspect.verify import root_password_problem
print(root_password_problem(sys.argv[1]))
"""


@pytest.mark.parametrize("method", ["-6", "-5", "-1"])
def test_root_password_check_needs_no_crypt_module(method: str) -> None:
    hashed = subprocess.run(
        ["openssl", "passwd", method, "changeme"], capture_output=True, text=True, check=True
    ).stdout.strip()
    shadow = f"root:{hashed}:20000:0:99999:7:::\n"
    result = subprocess.run(
        [sys.executable, "-c", NO_CRYPT_MODULE, shadow], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "root's password is the well-known 'changeme'"
    other = subprocess.run(
        ["openssl", "passwd", method, "a long unguessable phrase"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", NO_CRYPT_MODULE, f"root:{other}:1::::::\n"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "", result.stderr
