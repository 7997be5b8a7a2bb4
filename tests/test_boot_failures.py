"""`imagesmith test` stops at once on a boot that cannot reach the checks.

The console lines are the ones real boots print (SeaBIOS, OVMF, GRUB,
initramfs-tools, Linux); the QEMU test boots a real, empty disk under both
firmwares and must end within seconds, naming what it saw.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from imagesmith.inspect import vmtest

CONSOLES = {
    "No bootable device": (
        "Booting from Hard Disk...\nBoot failed: not a bootable disk\n\nNo bootable device.\n",
        "the firmware found nothing to boot",
    ),
    "PXE": (
        'BdsDxe: failed to load Boot0001 "UEFI QEMU HARDDISK": Not Found\n>>Start PXE over IPv4.\n',
        "the firmware fell through to network boot (PXE)",
    ),
    "grub prompt": (
        "GNU GRUB  version 2.12\n\nMinimal BASH-like line editing is supported.\ngrub> ",
        "GRUB stopped at its prompt",
    ),
    "initramfs shell": (
        "Gave up waiting for root file system device.\n"
        "ALERT!  PARTUUID=1234 does not exist.  Dropping to a shell!\n(initramfs) ",
        "the initramfs could not mount the root and dropped to its shell",
    ),
    "kernel panic": (
        "[    1.52] VFS: Unable to mount root fs on unknown-block(0,0)\n"
        "[    1.53] Kernel panic - not syncing: VFS: Unable to mount root fs\n",
        "the kernel panicked",
    ),
}


@pytest.mark.parametrize("name", CONSOLES)
def test_boot_failure_is_recognised_with_its_lines(name: str) -> None:
    console, what = CONSOLES[name]
    seen = vmtest.boot_failure(console)
    assert seen is not None and seen[0] == what
    assert seen[1] and all(line.strip() in console for line in seen[1])


def test_a_normal_boot_is_not_a_failure() -> None:
    normal = (
        "iPXE 00:03.0 CA00 PCI2.10 PnP PMM+7EFCF0A0+7EF0F0A0 CA00\n"
        "Booting from Hard Disk...\nWelcome to GRUB!\n"
        "[    0.000000] Linux version 6.12.0-1-amd64\n"
        "Begin: Running /scripts/local-premount ... done.\n"
        "Debian GNU/Linux 13 server ttyS0\n\nserver login: "
    )
    assert vmtest.boot_failure(normal) is None


@pytest.mark.boot
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_an_empty_disk_fails_at_once_naming_what_the_firmware_said(
    tmp_path: Path, firmware: str
) -> None:
    disk = tmp_path / "empty.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "64M"], check=True)
    started = time.monotonic()
    result = vmtest.test_image(disk, firmware=firmware, timeout=240)
    assert not result.passed
    assert time.monotonic() - started < 120, result.summary()
    assert result.reason.startswith("the image did not boot: the firmware"), result.summary()
    assert any(line.startswith("  decided by: ") for line in result.details), result.summary()
