"""Private repositories, local .debs, users and network, for real.

A signed apt repository is served over HTTPS on loopback and refuses
clients without a certificate from its CA. One image installs a package
from it, and a class's local .deb that depends on that package, in the same
apt run. The image must carry no trace of the certificate, the key or the
repository, and a boot test logs in over SSH as the configured user.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from imagesmith.host.aptsources import host_debian_mirror
from imagesmith.host.run import stop_process
from imagesmith.inspect.imagefiles import image_tree
from imagesmith.inspect.qemu import find_firmware, qemu_argv
from imagesmith.tree.aptsources import BUILD_DIR_PARENT
from tests.conftest import EXAMPLES, imagesmith
from tests.repo_server import build_deb, make_certificates, make_repository, serve_https

pytestmark = [pytest.mark.build]


@dataclass
class Vendor:
    space: Path
    secrets: Path
    uri: str
    requests: list[str]
    ssh_key: Path
    out: Path


VENDOR_CLASS = """\
description = "A proprietary package from a client-certificate repository"

[packages]
install = ["vendor-tool", "local-tool"]

[[repositories]]
name = "vendor"
uri = "{uri}"
suites = ["trixie"]
components = ["main"]
signed_by = "{secrets}/repo-key.gpg"
ca_cert = "{secrets}/ca.crt"
client_cert = "{secrets}/client.crt"
client_key = "env:VENDOR_CLIENT_KEY"
keep = false

[[users]]
name = "admin"
uid = 1500
groups = ["adm", "operators"]
sudo = true
authorized_keys = ["{pubkey}"]
"""


@pytest.fixture(scope="session")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vendor]:
    base = tmp_path_factory.mktemp("vendor")
    secrets = base / "secrets"  # outside the config space, as users keep them
    secrets.mkdir()
    make_certificates(secrets)
    debs = base / "debs"
    debs.mkdir()
    vendor_deb = build_deb(base, "vendor-tool", "less", debs)
    local_deb = build_deb(base, "local-tool", "vendor-tool", debs)
    shutil.move(
        make_repository(base / "repo", [vendor_deb], base / "gnupg", "trixie"),
        secrets / "repo-key.gpg",
    )
    ssh_key = base / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_key)], check=True)
    with serve_https(base / "repo", secrets) as (uri, requests):
        space = base / "space"
        shutil.copytree(EXAMPLES, space)
        vendor_class = space / "classes" / "vendor"
        (vendor_class / "debs").mkdir(parents=True)
        shutil.copy(local_deb, vendor_class / "debs")
        pubkey = (base / "id_ed25519.pub").read_text().strip()
        (vendor_class / "class.toml").write_text(
            VENDOR_CLASS.format(uri=uri, secrets=secrets, pubkey=pubkey)
        )
        config = space / "imagesmith.toml"
        config.write_text(
            config.read_text().replace(
                '"example"]\nsize = "2GiB"\noutputs = ["raw", "qcow2"]',
                '"example", "vendor"]\nsize = "2GiB"\noutputs = ["raw"]\nhostname = "fleet-01"',
                1,
            )
        )
        yield Vendor(space, secrets, uri, requests, ssh_key, base / "out")


def vendor_env(vendor: Vendor, *, with_key: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if with_key:
        env["VENDOR_CLIENT_KEY"] = (vendor.secrets / "client.key").read_text()
    return env


@pytest.fixture(scope="session")
def vendor_image(vendor: Vendor) -> Path:
    result = imagesmith(
        "build", "-C", vendor.space, "-o", vendor.out, "server", env=vendor_env(vendor)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return vendor.out / "server.raw"


def test_without_client_certificate_the_build_fails_naming_the_repository(
    vendor: Vendor, tmp_path: Path
) -> None:
    space = tmp_path / "space"
    shutil.copytree(vendor.space, space)
    class_file = space / "classes/vendor/class.toml"
    text = class_file.read_text()
    text = re.sub(r"client_(cert|key) = .*\n", "", text)
    class_file.write_text(text)
    result = imagesmith(
        "build",
        "-C",
        space,
        "-o",
        tmp_path / "out",
        "server",
        env=vendor_env(vendor, with_key=False),
    )
    assert result.returncode == 1
    assert f"repository 'vendor' ({vendor.uri}) failed" in result.stderr, result.stderr[-3000:]
    assert "client_cert" in result.stderr  # the hint says what to check
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_secret_is_a_config_error(vendor: Vendor, tmp_path: Path) -> None:
    result = imagesmith(
        "build",
        "-C",
        vendor.space,
        "-o",
        tmp_path / "out",
        "server",
        env=vendor_env(vendor, with_key=False),
    )
    assert result.returncode == 2
    assert "environment variable VENDOR_CLIENT_KEY is not set" in result.stderr
    assert "[[repositories]] #1" in result.stderr
    # The client certificate, read before the key failed, is gone from the host too.
    assert not list(BUILD_DIR_PARENT.glob("imagesmith-build-*"))


def data_extents(path: Path) -> Iterator[bytes]:
    """The data of a sparse file, in chunks, skipping holes."""
    with path.open("rb") as f:
        fd, size, position = f.fileno(), path.stat().st_size, 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            while start < end:
                chunk = f.read(min(end - start, 16 * 1024 * 1024))
                yield chunk
                start += len(chunk)
            position = end


def test_with_client_certificate_the_image_has_the_packages_and_no_trace(
    vendor: Vendor, vendor_image: Path
) -> None:
    # apt reached the repository through the client certificate (the .deb
    # itself may come from the shared .deb cache of an earlier build).
    assert any(r.endswith("/dists/trixie/InRelease") for r in vendor.requests), vendor.requests
    result = imagesmith("verify", vendor_image)
    assert result.returncode == 0, result.stdout + result.stderr
    # Independent of the scanner: not one byte sequence of any secret on the disk.
    needles = [
        line.encode()
        for name in ("client.crt", "client.key")
        for line in (vendor.secrets / name).read_text().splitlines()
        if len(line) > 40  # base64 body lines, unique to these files
    ]
    assert needles
    overlap = max(len(n) for n in needles)
    previous = b""
    for chunk in data_extents(vendor_image):
        window = previous + chunk
        assert not any(n in window for n in needles), "a client certificate or key is on the disk"
        previous = chunk[-overlap:]
    with image_tree(vendor_image) as tree:
        status = (tree / "var/lib/dpkg/status").read_text()
        for package in ("vendor-tool", "local-tool", "sudo", "systemd-resolved"):
            assert re.search(rf"^Package: {package}\nStatus: install ok installed", status, re.M), (
                package
            )
        sources = (tree / "etc/apt/sources.list").read_text()
        assert "127.0.0.1" not in sources and "file:" not in sources
        assert not list((tree / "etc/apt/sources.list.d").glob("*"))
        assert not (tree / "etc/apt/auth.conf.d").exists() or not list(
            (tree / "etc/apt/auth.conf.d").iterdir()
        )
        assert not (tree / "etc/apt/apt.conf.d/99mmdebstrap").exists()
        assert not list((tree / "var/tmp").iterdir())
        assert (tree / "etc/hostname").read_text() == "fleet-01\n"
        assert (tree / "etc/sudoers.d/imagesmith-admin").read_text().startswith("admin ALL=")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.boot
def test_ssh_login_as_the_configured_user(
    vendor: Vendor, vendor_image: Path, tmp_path: Path
) -> None:
    code, variables = find_firmware()
    shutil.copyfile(variables, tmp_path / "vars.fd")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(vendor_image),
            str(overlay),
        ],
        check=True,
    )
    port = free_port()
    argv = qemu_argv(
        disk=overlay, disk_fmt="qcow2", firmware_code=code, firmware_vars=tmp_path / "vars.fd",
        accel=os.environ.get("IMAGESMITH_ACCEL", "tcg"), memory=1024,
        serial=[f"file:{tmp_path / 'console.log'}"], forwards={port: 22},
    )  # fmt: skip
    ssh = [
        "ssh", "-i", str(vendor.ssh_key), "-p", str(port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=5", "admin@127.0.0.1",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            probe = subprocess.run([*ssh, "true"], capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert proc.poll() is None, "QEMU exited"
            assert time.monotonic() < deadline, (tmp_path / "console.log").read_text()[-3000:]
            time.sleep(3)

        def guest(command: str) -> str:
            result = subprocess.run([*ssh, command], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"{command}: {result.stderr}"
            return result.stdout.strip()

        identity = guest("id")
        assert identity.startswith("uid=1500(admin)")
        assert "(adm)" in identity and "(operators)" in identity
        guest("sudo -n true")
        assert guest("hostname") == "fleet-01"
        assert guest("systemctl is-active serial-getty@ttyS0.service") == "active"
        assert guest("sudo -n passwd -S root").split()[1] == "L"
        assert guest("cat /usr/share/local-tool/hello") == "hello from local-tool"
        assert guest("systemctl is-active systemd-networkd systemd-resolved").split() == [
            "active",
            "active",
        ]
        # DNS works through systemd-resolved: resolve the archive host the build used.
        archive_host = urlsplit(host_debian_mirror()).hostname
        assert guest(f"getent hosts {archive_host}")
    finally:
        stop_process(proc)
