"""The container example: an OCI archive and a rootfs tarball from the same classes.

Proven with standard tools, never with our own reader: skopeo inspects the
archive and copies it to an OCI layout, umoci unpacks that, and a command
runs in the unpacked root filesystem (chroot in private namespaces). podman
runs it too where podman can run containers on this machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.build]


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,  # type: ignore[call-overload]
    )


@pytest.fixture(scope="session")
def unpacked(built_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """skopeo copy to an OCI layout, then umoci unpack: the bundle directory."""
    work = tmp_path_factory.mktemp("oci")
    archive = built_examples / "container.oci.tar"
    copied = run("skopeo", "copy", "-q", f"oci-archive:{archive}", f"oci:{work / 'layout'}:latest")
    assert copied.returncode == 0, copied.stderr
    bundle = work / "bundle"
    unpack = run("umoci", "unpack", "--image", f"{work / 'layout'}:latest", bundle)
    assert unpack.returncode == 0, unpack.stderr
    return bundle


def test_skopeo_inspects_the_archive_with_the_configured_image_config(
    built_examples: Path,
) -> None:
    archive = built_examples / "container.oci.tar"
    result = run("skopeo", "inspect", "--config", f"oci-archive:{archive}")
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)
    config = image["config"]
    assert config["Cmd"] == ["/bin/bash"]
    assert "LANG=C.UTF-8" in config["Env"]
    assert any(e.startswith("PATH=") for e in config["Env"])
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "container"
    # new-ssh-host-keys (switched on by default) applies to containers too.
    assert labels["io.imagesmith.classes"] == "new-ssh-host-keys example"
    assert labels["org.opencontainers.image.vendor"] == "Example"
    manifest = json.loads((built_examples / "container.manifest.json").read_text())
    assert labels["org.opencontainers.image.created"] == image["created"]
    assert manifest["target"] == "container"
    assert manifest["skipped_classes"] == ["base", "grow-root", "new-fs-uuid", "uefi"]
    assert "disk" not in manifest
    assert image["architecture"] == "amd64" and image["os"] == "linux"
    plain = run("skopeo", "inspect", f"oci-archive:{archive}")
    assert plain.returncode == 0, plain.stderr
    assert len(json.loads(plain.stdout)["Layers"]) == 1


def installed_packages(root: Path) -> dict[str, str]:
    packages, name = {}, ""
    for line in (root / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Status: ") and line.endswith(" installed"):
            packages[name] = line
    return packages


def test_unpacked_image_has_the_classes_files_and_packages_and_no_boot_parts(
    unpacked: Path,
) -> None:
    root = unpacked / "rootfs"
    assert "Built by imagesmith" in (root / "etc/motd").read_text()  # example class files/
    packages = installed_packages(root)
    assert "openssh-server" in packages and "less" in packages  # example class packages
    assert not [p for p in packages if p.startswith(("linux-image", "grub", "initramfs-tools"))]
    assert not list((root / "boot").glob("vmlinuz*")) and not (root / "boot/grub").exists()
    assert not (root / "usr/sbin/update-initramfs").exists()
    assert not (root / "etc/fstab").exists() or "PARTUUID" not in (root / "etc/fstab").read_text()
    config = json.loads((unpacked / "config.json").read_text())
    assert config["process"]["args"] == ["/bin/bash"]


def test_a_command_runs_in_the_unpacked_image(unpacked: Path) -> None:
    result = run(
        "unshare", "--mount", "--pid", "--fork", "chroot", unpacked / "rootfs",
        "/bin/sh", "-c", "cat /etc/motd && dpkg-query -W -f='${Status}' less",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Built by imagesmith" in result.stdout
    assert result.stdout.endswith("install ok installed")


def test_rootfs_tarball_holds_the_same_tree(built_examples: Path, unpacked: Path) -> None:
    with tarfile.open(built_examples / "container.rootfs.tar") as tar:
        names = {n.removeprefix("./").rstrip("/") for n in tar.getnames()}
        motd = tar.extractfile("./etc/motd")
        assert motd is not None and b"Built by imagesmith" in motd.read()
        owners = {m.uid for m in tar.getmembers()}
    assert "usr/bin/less" in names and "etc/ssh/sshd_config" in names
    assert not [n for n in names if n.startswith("boot/vmlinuz")]
    assert not [n for n in names if n.startswith("dev/")]
    assert 0 in owners
    unpacked_names = {
        p.relative_to(unpacked / "rootfs").as_posix() for p in (unpacked / "rootfs").rglob("*")
    }
    assert names - {"", ".", "dev"} <= unpacked_names


def podman_runs(*argv: str) -> subprocess.CompletedProcess[str]:
    return run("podman", *argv)


def test_podman_runs_a_command_in_the_image(built_examples: Path) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed on this machine")
    # The control: the plain rootfs tarball, imported. If podman cannot run
    # even that, this machine cannot run containers (see FIELD-NOTES).
    control = podman_runs(
        "import", str(built_examples / "container.rootfs.tar"), "imagesmith-control"
    )
    assert control.returncode == 0, control.stderr
    ran = podman_runs("run", "--rm", "imagesmith-control", "/bin/true")
    podman_runs("rmi", "-f", "imagesmith-control")
    if ran.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {ran.stderr.strip()[-300:]}")
    loaded = podman_runs("load", "-i", str(built_examples / "container.oci.tar"))
    assert loaded.returncode == 0, loaded.stderr
    image = loaded.stdout.strip().split()[-1]
    try:
        result = podman_runs("run", "--rm", image, "cat", "/etc/motd")
        assert result.returncode == 0, result.stderr
        assert "Built by imagesmith" in result.stdout
    finally:
        podman_runs("rmi", "-f", image)
