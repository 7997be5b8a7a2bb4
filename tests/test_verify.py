"""`imagesmith verify` on deliberately dirty images, one per finding.

Each dirty image is a small root tree made here, packed as a rootfs tarball
or assembled into a real GPT disk image (ext4, btrfs, qcow2) with the same
code the build uses, then scanned by the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from imagesmith.config.layout import MiB, UuidSource, plan_disk_layout
from imagesmith.disk.filesystems import make_btrfs_image, make_esp, make_ext4, place_image
from imagesmith.disk.gpt import write_partition_table
from tests.conftest import imagesmith

HOST_RESOLV = Path("/etc/resolv.conf")
PEM_KEY = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
)


def clean_tree(root: Path) -> Path:
    for rel, text in {
        "etc/machine-id": "",
        "etc/shadow": "root:*:20000:0:99999:7:::\nadmin:!:20000:0:99999:7:::\n",
        "etc/fstab": "PARTUUID=x / ext4 defaults,errors=remount-ro 0 1\n",
        "etc/apt/sources.list": "deb http://mirror.example/debian trixie main\n",
        "etc/apt/apt.conf.d/70debconf": 'DPkg::Pre-Install-Pkgs {"/usr/sbin/dpkg-preconfigure --apt || true";};\n',
        "etc/dpkg/dpkg.cfg.d/excludes": "path-exclude=/usr/share/doc/*\n",
        "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA host\n",
        "var/lib/dpkg/status": "Package: base-files\nStatus: install ok installed\n",
        "usr/share/ca-certificates/x.crt": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "etc/resolv.conf": "",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def put(rel: str, text: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return apply


def append(rel: str, text: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        with (root / rel).open("a") as f:
            f.write(text)

    return apply


def shadow_root(field: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / "etc/shadow").write_text(f"root:{field}:20000:0:99999:7:::\n")

    return apply


DIRTY: dict[str, Callable[[Path], None]] = {
    "private-key": put("etc/vendor/client.key", PEM_KEY),
    "apt-auth": put(
        "etc/apt/auth.conf.d/vendor.conf", "machine vendor.example login u password p\n"
    ),
    "build-repository": append(
        "etc/apt/sources.list", "deb [trusted=yes] file:///var/tmp/imagesmith-build-1/local ./\n"
    ),
    "unsafe-io": put("etc/dpkg/dpkg.cfg.d/unsafe-io", "force-unsafe-io\n"),
    "eatmydata": put("etc/ld.so.preload", "/usr/lib/x86_64-linux-gnu/libeatmydata.so\n"),
    "policy-rc.d": put("usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n"),
    "fstab-nobarrier": put("etc/fstab", "PARTUUID=x / ext4 defaults,nobarrier 0 1\n"),
    "ssh-host-keys": put("etc/ssh/ssh_host_ed25519_key", "key material\n"),
    "machine-id": put("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
    "apt-proxy": put(
        "etc/apt/apt.conf.d/01proxy", 'Acquire::http::Proxy "http://proxy.example:3142";\n'
    ),
    "root-password": shadow_root(""),
}


def tarball(tree: Path, target: Path) -> Path:
    with tarfile.open(target, "w") as tar:
        tar.add(tree, arcname=".")
    return target


def verify(image: Path) -> subprocess.CompletedProcess[str]:
    return imagesmith("verify", image, timeout=120)


def test_clean_tarball_passes(tmp_path: Path) -> None:
    result = verify(tarball(clean_tree(tmp_path / "root"), tmp_path / "clean.tar"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert "clean" in result.stderr


@pytest.mark.parametrize("finding", sorted(DIRTY))
def test_each_dirty_tarball_fails_with_its_finding(tmp_path: Path, finding: str) -> None:
    tree = clean_tree(tmp_path / "root")
    DIRTY[finding](tree)
    result = verify(tarball(tree, tmp_path / "dirty.tar"))
    assert result.returncode == 1, result.stdout
    codes = {line.split(":", 1)[0] for line in result.stdout.splitlines()}
    assert codes == {finding}, result.stdout


def test_known_root_password_is_found(tmp_path: Path) -> None:
    debian_hash = subprocess.run(
        ["openssl", "passwd", "-6", "debian"], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = clean_tree(tmp_path / "root")
    shadow_root(debian_hash)(tree)
    result = verify(tarball(tree, tmp_path / "dirty.tar"))
    assert result.returncode == 1
    assert "root-password: /etc/shadow: root's password is the well-known 'debian'" in result.stdout


def test_host_resolv_conf_is_found(tmp_path: Path) -> None:
    from imagesmith.inspect.verify import ScanContext, scan_tree

    tree = clean_tree(tmp_path / "root")
    (tree / "etc/resolv.conf").write_text("nameserver 192.0.2.53\n")
    scan = ScanContext(host_resolv_conf=b"nameserver 192.0.2.53\n")
    findings, _ = scan_tree(tree, scan)
    assert [f.code for f in findings] == ["host-resolv-conf"]
    # A different resolver configuration (the image's own) is not a finding.
    assert scan_tree(tree, ScanContext(host_resolv_conf=b"nameserver 198.51.100.1\n"))[0] == []


def test_build_secret_is_found_by_digest_from_the_manifest(tmp_path: Path) -> None:
    from imagesmith.build import default_cache_dir
    from imagesmith.cache.keys import hygiene_key
    from imagesmith.inspect.verify import key_id, secret_digest

    tree = clean_tree(tmp_path / "root")
    secret = b"-----BEGIN CERTIFICATE-----\nMIIBclientcert\n-----END CERTIFICATE-----\n"
    put("usr/local/share/leaked.crt", secret.decode())(tree)
    image = tarball(tree, tmp_path / "img.tar")
    assert verify(image).returncode == 0  # an ordinary certificate, as far as anyone knows
    key = hygiene_key(default_cache_dir())
    hygiene = {"secret_key_id": key_id(key), "secret_hmac_sha256": [secret_digest(secret, key)]}
    (tmp_path / "img.manifest.json").write_text(json.dumps({"hygiene": {**hygiene, "waivers": []}}))
    result = verify(image)
    assert result.returncode == 1
    assert "build-secret: /usr/local/share/leaked.crt" in result.stdout
    # Without the build host's key the digests are useless: nobody can test guesses.
    other = {"secret_key_id": key_id(b"x"), "secret_hmac_sha256": [secret_digest(secret, b"x")]}
    (tmp_path / "img.manifest.json").write_text(json.dumps({"hygiene": {**other, "waivers": []}}))
    assert verify(image).returncode == 0
    assert secret_digest(secret, key) != hashlib.sha256(secret.strip()).hexdigest()


def test_manifest_waiver_is_honoured_and_shown(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path / "root")
    DIRTY["machine-id"](tree)
    image = tarball(tree, tmp_path / "img.tar")
    manifest = {
        "hygiene": {"waivers": [{"finding": "machine-id", "reason": "appliance", "class": "x"}]}
    }
    (tmp_path / "img.manifest.json").write_text(json.dumps(manifest))
    result = verify(image)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("waived: machine-id: /etc/machine-id")


def disk_image(tree: Path, tmp_path: Path, filesystem: str) -> Path:
    layout = plan_disk_layout(
        size=600 * MiB, esp_size=64 * MiB, filesystem=filesystem, architecture="amd64",
        uuids=UuidSource("verify-test"),
    )  # fmt: skip
    disk = tmp_path / f"disk-{filesystem}.raw"
    write_partition_table(disk, layout)
    make_esp(disk, layout.esp, tmp_path / "no-esp-files")
    if filesystem == "btrfs":
        image = tmp_path / "root.btrfs"
        make_btrfs_image(image, layout.root, tree, size=layout.root.size)
        place_image(image, disk, layout.root)
    else:
        make_ext4(disk, layout.root, tree)
    return disk


@pytest.mark.parametrize("filesystem", ["ext4", "btrfs"])
def test_disk_images_are_read_without_mounting(tmp_path: Path, filesystem: str) -> None:
    tree = clean_tree(tmp_path / "root")
    disk = disk_image(tree, tmp_path, filesystem)
    assert verify(disk).returncode == 0
    DIRTY["ssh-host-keys"](tree)
    DIRTY["policy-rc.d"](tree)
    dirty = disk_image(tree, tmp_path, filesystem)
    qcow2 = tmp_path / "dirty.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(dirty), str(qcow2)], check=True)
    for image in (dirty, qcow2):
        result = verify(image)
        assert result.returncode == 1
        assert sorted(line.split(":")[0] for line in result.stdout.splitlines()) == [
            "policy-rc.d", "ssh-host-keys",
        ]  # fmt: skip


def test_private_key_findings_are_real_keys_no_package_ships(tmp_path: Path) -> None:
    from imagesmith.inspect.verify import ScanContext, check_file_contents

    tree = clean_tree(tmp_path / "root")
    # Code and data that only name the header (a parser, mime magic) hold no key.
    put(
        "usr/lib/python3/dist-packages/crypto/ssh.py",
        'HEADER = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n',
    )(tree)
    put("usr/share/mime/magic", "-----BEGIN RSA PRIVATE KEY-----\x00\x01binary\n")(tree)
    # A test suite's key that a package ships is the distribution's.
    put("usr/lib/python3/dist-packages/tornado/test/test.key", PEM_KEY)(tree)
    put(
        "var/lib/dpkg/info/python3-tornado.list",
        "/usr/lib/python3/dist-packages/tornado/test/test.key\n",
    )(tree)
    # One the build left is a finding.
    put("etc/vendor/client.key", PEM_KEY)(tree)
    found = [f.path for f in check_file_contents(tree, ScanContext())]
    assert found == ["/etc/vendor/client.key"]


def test_a_baseline_scan_reads_only_changed_files_and_keeps_what_it_knew(tmp_path: Path) -> None:
    """The scan of a tree mounted over a cached package stage: what the
    stage's files held is known; the changed files are read; a known file
    the build removed or rewrote no longer counts."""
    from imagesmith.inspect.verify import (
        Baseline,
        ContentFindings,
        ScanContext,
        check_file_contents,
        scan_contents,
    )

    tree = clean_tree(tmp_path / "root")
    for rel in ("etc/kept.key", "etc/removed.key", "etc/rewritten.key", "etc/unread.key"):
        put(rel, PEM_KEY)(tree)
    known = scan_contents(tree, ScanContext())
    assert known == ContentFindings(
        frozenset(), frozenset({"etc/kept.key", "etc/removed.key", "etc/rewritten.key",
                                "etc/unread.key"}),
    )  # fmt: skip
    assert ContentFindings.from_json(known.to_json()) == known
    (tree / "etc/removed.key").unlink()
    put("etc/rewritten.key", "nothing secret now\n")(tree)
    put("etc/new.key", PEM_KEY)(tree)
    put("etc/other.key", PEM_KEY)(tree)  # not in the baseline's changed list: not read
    baseline = Baseline(
        ContentFindings(frozenset(), known.key_files - {"etc/unread.key"}),
        changed=frozenset({"etc/rewritten.key", "etc/new.key", "etc/removed.key"}),
    )
    found = [f.path for f in check_file_contents(tree, ScanContext(baseline=baseline))]
    assert found == ["/etc/kept.key", "/etc/new.key"]
    # A secret the build used, in a changed file, is found the same way.
    put("etc/new.conf", "token=s3cr3t-value\n")(tree)
    scan = ScanContext(
        secrets=(b"s3cr3t-value",),
        baseline=Baseline(ContentFindings(), frozenset({"etc/new.conf"})),
    )
    assert [(f.code, f.path) for f in check_file_contents(tree, scan)] == [
        ("build-secret", "/etc/new.conf")
    ]
