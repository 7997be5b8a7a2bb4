"""Build the example images for real and boot them in QEMU.

The images come from one session fixture; each boot test proves something
the others do not: ext4 from the qcow2 output, btrfs from the raw output
with the example's content checked inside the guest, the failure path of
`imagesmith test`, and its timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, imagesmith

pytestmark = [pytest.mark.build]
CHECKS = REPO / "tests" / "checks"
GOLDEN = REPO / "tests" / "golden"


def checks_for(tmp_path: Path, fstype: str) -> Path:
    """The example checks plus one that insists on the root filesystem type."""
    checks = tmp_path / "checks"
    shutil.copytree(CHECKS / "example", checks)
    script = checks / "30-root-fstype"
    script.write_text(f'#!/bin/sh\nset -eu\ntest "$(findmnt -n -o FSTYPE /)" = {fstype}\n')
    script.chmod(0o755)
    return checks


@pytest.mark.boot
def test_ext4_image_boots_from_qcow2(built_examples: Path, tmp_path: Path) -> None:
    result = imagesmith(
        "test", built_examples / "server.qcow2", "--checks", checks_for(tmp_path, "ext4")
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for check in ("multi-user-reached", "no-failed-units", "root-read-write",
                  "serial-getty-active", "10-example-content", "30-root-fstype"):  # fmt: skip
        assert re.search(rf"ok\s+{check}", result.stdout), result.stdout


@pytest.mark.boot
def test_btrfs_image_boots_from_raw(built_examples: Path, tmp_path: Path) -> None:
    before = hashlib.sha256((built_examples / "server-btrfs.raw").read_bytes()).hexdigest()
    result = imagesmith(
        "test", built_examples / "server-btrfs.raw", "--checks", checks_for(tmp_path, "btrfs")
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "ok   30-root-fstype" in result.stdout
    # The test booted a throwaway overlay: the image itself is untouched.
    after = hashlib.sha256((built_examples / "server-btrfs.raw").read_bytes()).hexdigest()
    assert before == after


@pytest.mark.boot
def test_failing_guest_check_fails_the_test(built_examples: Path) -> None:
    result = imagesmith("test", built_examples / "server.raw", "--checks", CHECKS / "failing")
    assert result.returncode == 1, result.stdout
    assert "FAIL 50-always-fails" in result.stdout
    assert "this check fails on purpose" in result.stdout
    # The built-in checks still ran and passed.
    assert "ok   no-failed-units" in result.stdout


@pytest.mark.boot
def test_timeout_fails_cleanly(built_examples: Path) -> None:
    result = imagesmith("test", built_examples / "server.raw", "--timeout", "8")
    assert result.returncode == 1
    assert "no result from the guest within 8s" in result.stdout
    assert not qemu_processes()


def qemu_processes() -> list[str]:
    """QEMU processes `imagesmith test` started: their disks live in imagesmith-vm-* dirs."""
    ps = subprocess.run(["ps", "-eo", "pid,args", "-ww"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "qemu-system" in line and "imagesmith-vm-" in line]


def qemu_children(pid: int) -> list[int]:
    ps = subprocess.run(
        ["ps", "-o", "pid=,comm=", "--ppid", str(pid)], capture_output=True, text=True
    )
    return [int(line.split()[0]) for line in ps.stdout.splitlines() if "qemu-system" in line]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


def normalised_sfdisk(image: Path) -> dict[str, object]:
    """`sfdisk -J` with the per-build UUIDs and the file name taken out."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "-J", str(image)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    table["id"] = "<disk-uuid>"
    table["device"] = "<image>"
    for part in table["partitions"]:
        part["uuid"] = "<uuid>"
        part["node"] = part["node"].replace(str(image), "<image>")
    return table


def test_disk_layout_matches_golden(built_examples: Path) -> None:
    golden = json.loads((GOLDEN / "server-sfdisk.json").read_text())
    assert normalised_sfdisk(built_examples / "server.raw") == golden


def test_manifest_records_the_build(built_examples: Path) -> None:
    manifest = json.loads((built_examples / "server.manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == [
        "base", "grow-root", "new-fs-uuid", "new-ssh-host-keys", "uefi", "example",
    ]  # fmt: skip
    assert manifest["classes"][1]["switched_by"] == "grow_root"
    packages = {p["name"]: p["version"] for p in manifest["packages"]}
    assert "openssh-server" in packages and "linux-image-amd64" in packages
    assert all(packages.values())
    assert f"linux-image-{manifest['kernel']}" in packages
    raw = built_examples / "server.raw"
    assert manifest["outputs"]["raw"]["sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    assert manifest["outputs"]["raw"]["size"] == raw.stat().st_size == 2 * 1024**3
    parts = manifest["disk"]["partitions"]
    assert [p["filesystem"] for p in parts] == ["vfat", "ext4"]
    sfdisk = json.loads(
        subprocess.run(["sfdisk", "-J", str(raw)], capture_output=True, text=True).stdout
    )
    assert [p["uuid"].lower() for p in sfdisk["partitiontable"]["partitions"]] == [
        p["uuid"] for p in parts
    ]
    for stage in ("bootstrap and packages", "customise", "boot setup", "finalise", "assemble disk"):
        assert manifest["timings"][stage] >= 0
    assert "assemble container" not in manifest["timings"]  # only stages that apply run
    log = (built_examples / "build.log").read_text()
    assert re.search(r"bootstrap and packages: done in \d+\.\ds", log)
    btrfs = json.loads((built_examples / "server-btrfs.manifest.json").read_text())
    assert btrfs["disk"]["partitions"][1]["filesystem"] == "btrfs"


@pytest.mark.boot
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killing_imagesmith_test_leaves_no_qemu(built_examples: Path, signum: int) -> None:
    image = built_examples / "server.raw"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagesmith", "test", str(image), "--timeout", "120"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (children := qemu_children(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)  # QEMU is up and booting
    os.kill(proc.pid, signum)
    returncode = proc.wait(timeout=60)
    assert returncode == (130 if signum == signal.SIGTERM else -signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in children)
    assert not qemu_processes()
