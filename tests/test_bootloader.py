"""Unit tests for the text the boot stage writes: fstab, kernel command line, grub.cfg."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagesmith.config.layout import UuidSource, plan_disk_layout
from imagesmith.config.space import load_config_space, resolve_image
from imagesmith.context import BuildContext
from imagesmith.errors import BuildError, ConfigError
from imagesmith.stages.bootsetup import (
    find_kernel_version,
    fstab_text,
    grub_cfg_text,
    kernel_cmdline,
)

KERNEL = "6.12.38+deb13-amd64"


def make_context(tmp_path: Path, settings: str = "", *, defaults: str = "") -> BuildContext:
    """A BuildContext for image `vm` of a fresh config space, with a seeded layout."""
    space = tmp_path / "space"
    space.mkdir()
    (space / "imagesmith.toml").write_text(
        textwrap.dedent(
            """
            [defaults]
            {defaults}
            [images.vm]
            classes = ["base", "uefi"]
            {settings}
            """
        ).format(defaults=defaults, settings=settings)
    )
    image = resolve_image(load_config_space(space), "vm")
    s = image.settings
    layout = plan_disk_layout(
        size=s.size,
        esp_size=s.esp_size,
        filesystem=s.filesystem,
        architecture=s.architecture,
        uuids=UuidSource("boot-test"),
    )
    ctx = BuildContext(
        image=image,
        workdir=tmp_path / "work",
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        layout=layout,
    )
    ctx.kernel_version = KERNEL
    return ctx


def fstab_entries(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


def test_fstab_ext4_names_partitions_by_partuuid(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    assert fstab_entries(fstab_text(ctx.layout)) == [
        [f"PARTUUID={ctx.layout.root.uuid}", "/", "ext4", "defaults,errors=remount-ro", "0", "1"],
        [f"PARTUUID={ctx.layout.esp.uuid}", "/boot/efi", "vfat", "umask=0077", "0", "0"],
    ]


def test_fstab_btrfs_root_is_not_fscked_at_boot(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, 'filesystem = "btrfs"')
    root, esp = fstab_entries(fstab_text(ctx.layout))
    assert root == [f"PARTUUID={ctx.layout.root.uuid}", "/", "btrfs", "defaults", "0", "0"]
    assert esp[1:3] == ["/boot/efi", "vfat"]


def test_kernel_cmdline_with_serial_console(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    words = kernel_cmdline(ctx).split()
    assert words == [
        f"root=PARTUUID={ctx.layout.root.uuid}",
        "ro",
        f"imagesmith.image_fs_uuid={ctx.layout.root.fs_uuid}",
        "console=tty0",
        "console=ttyS0,115200",
    ]


def test_kernel_cmdline_serial_console_is_the_last_console(tmp_path: Path) -> None:
    ctx = make_context(
        tmp_path,
        'serial_console = "ttyS1,9600"\nkernel_cmdline = ["quiet"]',
        defaults='kernel_cmdline = ["systemd.show_status=1"]',
    )
    words = kernel_cmdline(ctx).split()
    assert words[0] == f"root=PARTUUID={ctx.layout.root.uuid}"
    assert [w for w in words if w.startswith("console=")][-1] == "console=ttyS1,9600"
    # Extra words come after ours, in merge order: [defaults] first, then the image.
    assert words[-2:] == ["systemd.show_status=1", "quiet"]


def test_kernel_cmdline_without_serial_console(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, 'serial_console = ""\nnew_fs_uuid = false')
    assert kernel_cmdline(ctx) == f"root=PARTUUID={ctx.layout.root.uuid} ro"


def test_grub_cfg_ext4_with_serial_console(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    cmdline = (
        f"root=PARTUUID={ctx.layout.root.uuid} ro imagesmith.image_fs_uuid={ctx.layout.root.fs_uuid}"
        " console=tty0 console=ttyS0,115200"
    )
    assert grub_cfg_text(ctx) == (
        "# Written by imagesmith.\n"
        "set timeout=1\n"
        "set default=0\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "insmod part_gpt\n"
        "insmod ext2\n"
        f"menuentry 'vm (Debian trixie, {KERNEL})' {{\n"
        f"    linux /boot/vmlinuz-{KERNEL} {cmdline}\n"
        f"    initrd /boot/initrd.img-{KERNEL}\n"
        "}\n"
    )


def test_grub_cfg_btrfs_loads_the_btrfs_module(tmp_path: Path) -> None:
    lines = grub_cfg_text(make_context(tmp_path, 'filesystem = "btrfs"')).splitlines()
    assert "insmod btrfs" in lines
    assert "insmod ext2" not in lines


def test_grub_cfg_serial_unit_and_speed_follow_the_setting(tmp_path: Path) -> None:
    lines = grub_cfg_text(make_context(tmp_path, 'serial_console = "ttyS1,9600"')).splitlines()
    assert "serial --unit=1 --speed=9600" in lines


def test_grub_cfg_serial_speed_defaults_to_115200(tmp_path: Path) -> None:
    lines = grub_cfg_text(make_context(tmp_path, 'serial_console = "ttyS2"')).splitlines()
    assert "serial --unit=2 --speed=115200" in lines


def test_serial_console_without_speed_gives_grub_and_kernel_the_same_speed(
    tmp_path: Path,
) -> None:
    ctx = make_context(tmp_path, 'serial_console = "ttyS2"')
    [serial] = [line for line in grub_cfg_text(ctx).splitlines() if line.startswith("serial ")]
    grub_speed = serial.split("--speed=")[1]
    console = [w for w in kernel_cmdline(ctx).split() if w.startswith("console=")][-1]
    assert console == f"console=ttyS2,{grub_speed}"


def test_grub_cfg_without_serial_console_uses_the_screen_only(tmp_path: Path) -> None:
    text = grub_cfg_text(make_context(tmp_path, 'serial_console = ""'))
    assert "serial" not in text
    assert "console=" not in text
    assert "insmod ext2\n" in text


def test_serial_console_grub_cannot_use_is_rejected_before_the_build(tmp_path: Path) -> None:
    try:
        ctx = make_context(tmp_path, 'serial_console = "hvc0"')
    except ConfigError:
        return
    grub_cfg_text(ctx)


def test_find_kernel_version_picks_the_newest(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    boot = ctx.tree / "boot"
    boot.mkdir(parents=True)
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-28-amd64"):
        (boot / f"vmlinuz-{version}").write_bytes(b"")
    (boot / "initrd.img-6.1.0-99-amd64").write_bytes(b"")
    assert find_kernel_version(ctx) == "6.1.0-10-amd64"


def test_find_kernel_version_without_a_kernel_is_a_build_error(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    (ctx.tree / "boot").mkdir(parents=True)
    with pytest.raises(BuildError) as e:
        find_kernel_version(ctx)
    assert e.value.exit_code == 1
    assert "base" in e.value.hint
