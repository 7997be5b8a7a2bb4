"""Legacy BIOS and hybrid images: built for real, booted under SeaBIOS and OVMF.

- `legacy` (example): BIOS only, btrfs root with no /boot partition, shipped
  as raw.zst: booted under SeaBIOS straight from the compressed file.
- `legacy --fs ext4`: the same with ext4, built once more.
- `hybrid` (example): boots under both firmwares.

Each boot passes only on the guest's own report; the checks also insist on
the root filesystem type and that /boot is no mount point of its own. The
disk tests look at the bytes biosboot.py wrote: boot.img's fields and the
untouched partition table.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from imagesmith.config.layout import plan_disk_layout
from imagesmith.disk.gpt import sfdisk_script
from tests.conftest import EXAMPLES, REPO, imagesmith

pytestmark = [pytest.mark.build]
CHECKS = REPO / "tests" / "checks"
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"


def checks_for(tmp_path: Path, fstype: str, classes: str) -> Path:
    """The example checks (for these classes), the root filesystem type, /boot on the root."""
    checks = tmp_path / "checks"
    shutil.copytree(CHECKS / "example", checks)
    content = checks / "10-example-content"
    text = content.read_text()
    # The first-boot switches add their classes right after base.
    switched = "base grow-root new-fs-uuid new-ssh-host-keys"
    assert f"built with classes: {switched} uefi example" in text
    content.write_text(
        text.replace(f"{switched} uefi example", classes.replace("base", switched, 1))
    )
    script = checks / "30-root-fstype"
    script.write_text(f'#!/bin/sh\nset -eu\ntest "$(findmnt -n -o FSTYPE /)" = {fstype}\n')
    script.chmod(0o755)
    script = checks / "31-boot-on-root"
    script.write_text("#!/bin/sh\nset -eu\n! mountpoint -q /boot\ntest -e /boot/grub/grub.cfg\n")
    script.chmod(0o755)
    return checks


def boot(image: Path, firmware: str, checks: Path) -> str:
    result = imagesmith("test", image, "--firmware", firmware, "--checks", checks, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f", {firmware}, " in result.stdout.splitlines()[0]
    for check in ("multi-user-reached", "no-failed-units", "serial-getty-active",
                  "10-example-content", "30-root-fstype", "31-boot-on-root"):  # fmt: skip
        assert f"ok   {check}" in result.stdout, result.stdout
    return result.stdout


@pytest.fixture(scope="session")
def bios_ext4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The legacy example image with an ext4 root, raw."""
    out = tmp_path_factory.mktemp("bios-ext4")
    result = imagesmith("build", "-C", EXAMPLES, "-o", out, "--fs", "ext4", "legacy")
    assert result.returncode == 0, result.stderr[-4000:]
    raw = out / "legacy.raw"
    subprocess.run(
        ["zstd", "-q", "-d", "--sparse", str(out / "legacy.raw.zst"), "-o", str(raw)], check=True
    )
    return raw


@pytest.mark.boot
def test_bios_btrfs_root_without_boot_partition_boots_under_seabios(
    built_examples: Path, tmp_path: Path
) -> None:
    image = built_examples / "legacy.raw.zst"
    # The firmware comes from the manifest beside the image: bios.
    result = imagesmith(
        "test", image, "--checks", checks_for(tmp_path, "btrfs", "base bios example"), timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert ", bios, " in result.stdout.splitlines()[0]
    assert "ok   30-root-fstype" in result.stdout and "ok   31-boot-on-root" in result.stdout


@pytest.mark.boot
def test_bios_ext4_boots_under_seabios(bios_ext4: Path, tmp_path: Path) -> None:
    boot(bios_ext4, "bios", checks_for(tmp_path, "ext4", "base bios example"))


@pytest.mark.boot
@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_hybrid_image_boots_under_both_firmwares(
    built_examples: Path, tmp_path: Path, firmware: str
) -> None:
    checks = checks_for(tmp_path, "ext4", "base uefi bios example")
    boot(built_examples / "hybrid.qcow2", firmware, checks)


def sfdisk_json(image: Path) -> dict[str, object]:
    out = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["partitiontable"]  # type: ignore[no-any-return]


def test_bios_disk_has_grub_in_the_mbr_and_the_bios_boot_partition(bios_ext4: Path) -> None:
    table = sfdisk_json(bios_ext4)
    parts = table["partitions"]  # type: ignore[index]
    assert [(p["name"], p["type"], p["start"], p["size"]) for p in parts][:1] == [
        ("bios", BIOS_BOOT_TYPE, 2048, 2048)
    ]
    assert [p["name"] for p in parts] == ["bios", "root"]
    with bios_ext4.open("rb") as f:
        mbr = f.read(512)
        f.seek(2048 * 512)
        core_first = f.read(512)
    assert struct.unpack_from("<Q", mbr, 0x5C)[0] == 2048  # kernel_sector: core.img
    assert mbr[0x64] == 0xFF  # boot_drive: as the BIOS says
    assert mbr[0x66:0x68] == b"\x90\x90"  # the drive check jump is off
    assert b"GRUB" in mbr[:440]
    start, length, segment = struct.unpack_from("<QHH", core_first, 500)
    assert (start, segment) == (2049, 0x820) and 0 < length < 2047
    assert core_first[488:500] == bytes(12)  # the blocklist terminator
    # The protective MBR sfdisk wrote is untouched from byte 440 on.
    s = json.loads((bios_ext4.with_suffix(".manifest.json")).read_text())["settings"]
    fresh = bios_ext4.parent / "fresh.raw"
    layout = plan_disk_layout(
        size=s["size"], esp_size=s["esp_size"], filesystem="ext4", architecture="amd64",
        firmware=("bios",),
    )  # fmt: skip
    with fresh.open("wb") as f:
        f.truncate(layout.size)
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(fresh)],
        input=sfdisk_script(layout).encode(), check=True,
    )  # fmt: skip
    assert fresh.read_bytes()[440:512] == mbr[440:512]
    fresh.unlink()


def test_hybrid_disk_layout_and_manifest(built_examples: Path) -> None:
    image = built_examples / "hybrid.qcow2"
    manifest = json.loads((built_examples / "hybrid.manifest.json").read_text())
    assert manifest["firmware"] == ["uefi", "bios"]
    parts = manifest["disk"]["partitions"]
    assert [(p["number"], p["name"], p["filesystem"]) for p in parts] == [
        (1, "bios", ""),
        (2, "esp", "vfat"),
        (3, "root", "ext4"),
    ]
    assert image.stat().st_size > 0
    legacy = json.loads((built_examples / "legacy.manifest.json").read_text())
    assert legacy["firmware"] == ["bios"]
    assert [p["name"] for p in legacy["disk"]["partitions"]] == ["bios", "root"]
    assert legacy["disk"]["partitions"][1]["filesystem"] == "btrfs"


def test_firmware_the_image_was_not_built_for_is_refused(built_examples: Path) -> None:
    result = imagesmith("test", built_examples / "legacy.raw.zst", "--firmware", "uefi", timeout=60)
    assert result.returncode == 2
    assert "built for bios only" in result.stderr
