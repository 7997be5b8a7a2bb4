"""Unit tests for targets and firmware: which classes apply, layouts, boot bytes.

Pure logic only: resolving images of a config space, the partition
arithmetic for bios and hybrid disks, the bytes biosboot.py patches, the
OCI image config, and how `imagesmith test` picks its firmware.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from imagesmith.config.layout import BIOS_BOOT_TYPE, DiskLayout, UuidSource, plan_disk_layout
from imagesmith.config.settings import GiB, MiB
from imagesmith.config.space import ResolvedImage, load_config_space, resolve_image
from imagesmith.disk.biosboot import patch_boot_img, patch_core_img
from imagesmith.disk.gpt import sfdisk_script
from imagesmith.errors import BuildError, ConfigError
from imagesmith.formats import manifest_for
from imagesmith.formats.oci import key_values
from imagesmith.inspect.qemu import pick_accel, pick_firmware
from tests.test_config import make_space

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def resolve(tmp_path: Path, image: str, classes: dict[str, str] | None = None) -> ResolvedImage:
    config = f"[images.x]\n{image}\n"
    return resolve_image(load_config_space(make_space(tmp_path, config, classes)), "x")


# --- classes and targets ---------------------------------------------------


def test_container_outputs_skip_the_disk_only_classes(tmp_path: Path) -> None:
    image = resolve(
        tmp_path,
        'classes = ["base", "uefi", "bios", "app"]\noutputs = ["oci", "tar"]',
        {"app": '[packages]\ninstall = ["less"]\n'},
    )
    assert image.target == "container"
    # new-ssh-host-keys (switched on by default) applies to containers too.
    assert image.class_names == ("new-ssh-host-keys", "app")
    assert [c.name for c in image.skipped_classes] == [
        "base", "grow-root", "new-fs-uuid", "uefi", "bios",
    ]  # fmt: skip
    assert image.packages == ("less", "passwd")
    # The skipped classes' settings do not apply either.
    assert image.settings.firmware == ()


def test_disk_outputs_apply_every_class_and_firmware_accumulates(tmp_path: Path) -> None:
    image = resolve(tmp_path, 'classes = ["base", "uefi", "bios"]\noutputs = ["raw.zst"]')
    assert image.target == "disk"
    assert image.settings.firmware == ("uefi", "bios")
    assert "grub-pc-bin" in image.packages and "grub-efi-amd64-bin" in image.packages
    assert image.skipped_classes == ()


def test_uefi_bios_and_hybrid_images_share_one_package_set(tmp_path: Path) -> None:
    """So they share one stage cache entry: `build --all` runs mmdebstrap once for them."""
    class_lists = ('"base", "uefi"', '"base", "bios"', '"base", "uefi", "bios"')
    sets = {
        frozenset(resolve(tmp_path / str(n), f"classes = [{classes}]").packages)
        for n, classes in enumerate(class_lists)
    }
    assert len(sets) == 1


def test_without_a_boot_class_a_disk_image_is_uefi(tmp_path: Path) -> None:
    image = resolve(tmp_path, 'classes = ["base"]')
    assert image.settings.boot_firmware == ("uefi",)


def test_a_class_can_be_for_containers_only(tmp_path: Path) -> None:
    classes = {"shell": 'targets = ["container"]\n[packages]\ninstall = ["less"]\n'}
    disk = resolve(tmp_path / "a", 'classes = ["base", "uefi", "shell"]', classes)
    assert [c.name for c in disk.skipped_classes] == ["shell"]
    assert "less" not in disk.packages


def test_extending_a_builtin_class_inherits_its_targets(tmp_path: Path) -> None:
    classes = {"base": 'extend = true\n[packages]\ninstall = ["vim"]\n'}
    image = resolve(tmp_path, 'classes = ["base"]\noutputs = ["tar"]', classes)
    assert [c.name for c in image.skipped_classes] == ["base", "grow-root", "new-fs-uuid"]


def test_mixed_disk_and_container_outputs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(tmp_path, 'classes = ["base"]\noutputs = ["raw", "oci"]')
    assert "raw make a disk image and oci a container image" in e.value.message
    assert "imagesmith.toml:" in e.value.message and e.value.exit_code == 2


@pytest.mark.parametrize("targets", ['["vm"]', "[]", '"disk"'])
def test_bad_class_targets_name_the_file(tmp_path: Path, targets: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(tmp_path, 'classes = ["c"]', {"c": f"targets = {targets}\n"})
    assert "class.toml:1:" in e.value.message and "targets" in e.value.message


@pytest.mark.parametrize("value", ['["NOEQUALS"]', '["=x"]'])
def test_container_env_must_be_key_value(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(tmp_path, f'classes = []\noutputs = ["oci"]\ncontainer_env = {value}')
    assert "container_env" in e.value.message


def test_container_env_later_value_wins() -> None:
    assert key_values(("A=1", "B=x=y", "A=3")) == {"A": "3", "B": "x=y"}


# --- layouts ---------------------------------------------------------------


def plan(firmware: tuple[str, ...], size: int = 2 * GiB) -> DiskLayout:
    return plan_disk_layout(
        size=size, esp_size=256 * MiB, filesystem="btrfs", architecture="amd64",
        firmware=firmware, uuids=UuidSource("t"),
    )  # fmt: skip


# The root ends on the last 4 KiB boundary before the backup GPT (33 sectors),
# where systemd-repart would grow it to.
ROOT_END = (2 * GiB - 33 * 512) // 4096 * 4096


def test_bios_layout_is_a_bios_boot_partition_then_root() -> None:
    layout = plan(("bios",))
    bios, root = layout.partitions
    assert (bios.number, bios.name, bios.type_uuid, bios.start, bios.size) == (
        1, "bios", BIOS_BOOT_TYPE, MiB, MiB,
    )  # fmt: skip
    assert bios.filesystem == ""
    assert (root.number, root.start, root.end) == (2, 2 * MiB, ROOT_END)
    assert layout.partition("esp") is None
    with pytest.raises(LookupError):
        _ = layout.esp


def test_hybrid_layout_has_bios_boot_esp_and_root_last() -> None:
    layout = plan(("uefi", "bios"))
    assert [(p.number, p.name, p.start, p.size) for p in layout.partitions] == [
        (1, "bios", MiB, MiB),
        (2, "esp", 2 * MiB, 256 * MiB),
        (3, "root", 258 * MiB, ROOT_END - 258 * MiB),
    ]
    assert plan(("bios", "uefi")) == layout


def test_uefi_layout_is_unchanged_by_the_firmware_argument() -> None:
    assert plan(("uefi",)) == plan_disk_layout(
        size=2 * GiB, esp_size=256 * MiB, filesystem="btrfs", architecture="amd64",
        uuids=UuidSource("t"),
    )  # fmt: skip


def test_sfdisk_script_for_a_bios_layout() -> None:
    script = sfdisk_script(plan(("bios",)))
    lines = script.splitlines()
    assert lines[4].startswith(f"start=2048, size=2048, type={BIOS_BOOT_TYPE}, ")
    assert lines[4].endswith('name="bios"')
    assert lines[5].startswith("start=4096, ")


def test_small_bios_disk_error_names_the_bios_boot_partition(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(tmp_path, 'classes = ["base", "bios"]\nsize = "200MiB"')
    assert "after the 1MiB BIOS boot partition" in e.value.message
    assert "ESP" not in e.value.message
    assert e.value.hint == "set size to at least 259MiB"
    # No ESP, so an ESP below the UEFI minimum is no error for a BIOS image.
    resolve(tmp_path / "b", 'classes = ["base", "bios"]\nesp_size = "1MiB"')


# --- boot.img and core.img -------------------------------------------------


def fake_boot_img() -> bytes:
    sector = bytearray(b"\xaa" * 512)
    sector[0x66:0x68] = b"\xeb\x05"  # boot_drive_check: jmp 3f
    sector[510:] = b"\x55\xaa"
    return bytes(sector)


def fake_mbr() -> bytes:
    sector = bytearray(512)
    sector[0x10:0x20] = b"B" * 16  # in the BPB area
    sector[446:462] = bytes.fromhex("000200eeffffff01000000ffff7f00") + b"\x00"
    sector[510:] = b"\x55\xaa"
    return bytes(sector)


def test_boot_img_points_at_core_and_keeps_the_partition_table() -> None:
    patched = patch_boot_img(fake_boot_img(), fake_mbr(), 2048)
    assert len(patched) == 512
    assert struct.unpack_from("<Q", patched, 0x5C)[0] == 2048
    assert patched[0x64] == 0xFF
    assert patched[0x66:0x68] == b"\x90\x90"
    assert patched[0x03:0x5A] == fake_mbr()[0x03:0x5A]
    assert patched[440:] == fake_mbr()[440:]
    assert patched[:3] == fake_boot_img()[:3]
    assert patched[0x6A:440] == fake_boot_img()[0x6A:440]


def test_boot_img_that_is_not_a_boot_sector_is_refused() -> None:
    with pytest.raises(BuildError):
        patch_boot_img(b"\x00" * 512, fake_mbr(), 2048)
    with pytest.raises(BuildError):
        patch_boot_img(fake_boot_img()[:-1], fake_mbr(), 2048)


def fake_core_img(sectors: int) -> bytes:
    image = bytearray(b"\x11" * (sectors * 512 - 100))
    image[488:500] = bytes(12)
    struct.pack_into("<QHH", image, 500, 2, sectors - 1, 0x820)  # as grub-mkimage leaves it
    return bytes(image)


def test_core_img_blocklist_names_its_own_sectors() -> None:
    patched = patch_core_img(fake_core_img(60), 2048)
    assert struct.unpack_from("<QHH", patched, 500) == (2049, 59, 0x820)
    assert patched[488:500] == bytes(12)
    assert patched[:488] == fake_core_img(60)[:488] and patched[512:] == fake_core_img(60)[512:]


def test_core_img_with_an_unexpected_blocklist_is_refused() -> None:
    wrong = bytearray(fake_core_img(60))
    struct.pack_into("<H", wrong, 508, 10)
    with pytest.raises(BuildError) as e:
        patch_core_img(bytes(wrong), 2048)
    assert "grub-mkimage -O i386-pc" in e.value.message


# --- imagesmith test: firmware and acceleration ----------------------------


def test_manifest_is_found_beside_every_image_format(tmp_path: Path) -> None:
    for name in ("a.raw", "a.qcow2", "a.raw.zst"):
        assert manifest_for(tmp_path / name) == tmp_path / "a.manifest.json"


def test_firmware_defaults_to_the_manifest_and_refuses_what_it_lacks(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    assert pick_firmware(image, None) == "uefi"  # no manifest
    (tmp_path / "a.manifest.json").write_text(json.dumps({"firmware": ["bios"]}))
    assert pick_firmware(image, None) == "bios"
    assert pick_firmware(image, "bios") == "bios"
    with pytest.raises(ConfigError) as e:
        pick_firmware(image, "uefi")
    assert "built for bios only" in e.value.message
    (tmp_path / "a.manifest.json").write_text(json.dumps({"firmware": ["uefi", "bios"]}))
    assert pick_firmware(image, None) == "uefi"
    assert pick_firmware(image, "bios") == "bios"


def test_accel_can_be_forced_for_bios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGESMITH_ACCEL", "tcg")
    assert pick_accel("bios") == "tcg"
    monkeypatch.setenv("IMAGESMITH_ACCEL", "kvm")
    assert pick_accel("bios") == "kvm"
