"""Unit tests for the disk layout arithmetic and the sfdisk script."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from imagesmith.config.layout import (
    DiskLayout,
    UuidSource,
    check_layout_fits,
    plan_disk_layout,
)
from imagesmith.config.settings import GiB, ImageSettings, MiB, merge_settings, parse_size
from imagesmith.disk.gpt import sfdisk_script
from imagesmith.errors import ConfigError

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def plan(
    size: int = 2 * GiB,
    esp_size: int = 256 * MiB,
    filesystem: str = "ext4",
    seed: str = "test",
) -> DiskLayout:
    return plan_disk_layout(
        size=size,
        esp_size=esp_size,
        filesystem=filesystem,
        architecture="amd64",
        uuids=UuidSource(seed) if seed else None,
    )


def test_esp_starts_at_one_mib_and_root_follows_it() -> None:
    layout = plan()
    assert (layout.esp.start, layout.esp.size) == (MiB, 256 * MiB)
    assert layout.root.start == 257 * MiB
    # The last 4 KiB boundary before the 33-sector backup GPT.
    assert layout.root.end == 2 * GiB - 20 * 1024
    assert layout.root.size == 2 * GiB - 257 * MiB - 20 * 1024


@pytest.mark.parametrize(
    ("size", "esp_size"),
    [
        (2 * GiB, 256 * MiB),
        (2 * GiB + 12345, 100 * MiB + 1),
        (3 * GiB - 1, 65 * MiB - 512),
        (10 * GiB + MiB // 2, 512 * MiB),
    ],
)
def test_partitions_are_mib_aligned_and_leave_room_for_the_backup_gpt(
    size: int, esp_size: int
) -> None:
    layout = plan(size=size, esp_size=esp_size)
    assert layout.esp.size % MiB == 0
    for part in layout.partitions:
        assert part.start % MiB == 0
        assert part.size % 4096 == 0
        assert part.start % 512 == 0 and part.size % 512 == 0
        assert part.start_sector * 512 == part.start
        assert part.size_sectors * 512 == part.size
    assert layout.esp.start == MiB
    assert layout.esp.size >= esp_size
    assert layout.esp.size - esp_size < MiB
    assert layout.root.start == layout.esp.end
    # The disk is rounded up to a whole MiB; the root ends on the last 4 KiB
    # boundary that leaves room for the backup GPT (33 sectors), where
    # systemd-repart would grow it to: nothing to grow at the image's size.
    assert layout.size % MiB == 0 and size <= layout.size < size + MiB
    assert layout.root.end % 4096 == 0
    assert 33 * 512 <= layout.size - layout.root.end < 33 * 512 + 4096


def test_unaligned_esp_size_rounds_up_to_the_next_mib() -> None:
    layout = plan(esp_size=100 * MiB + 1)
    assert layout.esp.size == 101 * MiB
    assert layout.root.start == 102 * MiB


def test_partition_types_names_and_filesystems() -> None:
    layout = plan(filesystem="btrfs")
    esp, root = layout.partitions
    assert (esp.number, esp.name, esp.type_uuid, esp.filesystem, esp.label) == (
        1,
        "esp",
        ESP_TYPE,
        "vfat",
        "ESP",
    )
    assert (root.number, root.name, root.type_uuid, root.filesystem, root.label) == (
        2,
        "root",
        ROOT_X86_64_TYPE,
        "btrfs",
        "root",
    )
    assert layout.size == 2 * GiB


def test_seeded_uuids_are_identical_between_runs() -> None:
    assert plan(seed="same") == plan(seed="same")
    assert plan(seed="same") != plan(seed="other")


def test_unseeded_uuids_differ_between_runs() -> None:
    first, second = plan(seed=""), plan(seed="")
    assert first.disk_uuid != second.disk_uuid
    assert first.root.uuid != second.root.uuid
    assert first.root.fs_uuid != second.root.fs_uuid
    assert first.esp.fs_uuid != second.esp.fs_uuid


@pytest.mark.parametrize("seed", ["test", ""])
def test_uuids_are_well_formed_and_distinct(seed: str) -> None:
    layout = plan(seed=seed)
    uuids = [layout.disk_uuid, layout.esp.uuid, layout.root.uuid, layout.root.fs_uuid]
    assert all(UUID_RE.match(u) for u in uuids)
    assert len(set(uuids)) == len(uuids)
    assert re.fullmatch(r"[0-9a-f]{8}", layout.esp.fs_uuid)


def test_uuid_source_seed_derivation_is_stable() -> None:
    # Changing how seeded UUIDs are derived changes every reproducible build.
    uuids = UuidSource("golden")
    assert uuids.next() == "01da4962-d3df-5aaa-bf05-ef705c0f8976"
    assert uuids.next_fat_serial() == "d108ba9c"


def test_sfdisk_script_for_a_seeded_layout() -> None:
    assert sfdisk_script(plan(seed="golden")) == (
        "label: gpt\n"
        "label-id: 5f32bd2a-4842-5ace-b5ca-23b91df8ef94\n"
        "unit: sectors\n"
        "\n"
        "start=2048, size=524288, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, "
        'uuid=01da4962-d3df-5aaa-bf05-ef705c0f8976, name="esp"\n'
        "start=526336, size=3667928, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, "
        'uuid=249e4276-2695-5fcb-9d5f-8de9086bd3ac, name="root"\n'
    )


def settings_for(size: str, esp_size: str = "256MiB") -> ImageSettings:
    return merge_settings(
        [{"size": parse_size(size, where="size"), "esp_size": parse_size(esp_size, where="esp")}]
    )


def test_check_layout_fits_accepts_the_defaults() -> None:
    check_layout_fits(merge_settings([]), where="w")


def test_check_layout_fits_rejects_a_small_esp() -> None:
    with pytest.raises(ConfigError) as e:
        check_layout_fits(settings_for("2GiB", "63MiB"), where="f.toml [images.a] size")
    assert e.value.message == ("f.toml [images.a] size: esp_size 63MiB is below the minimum 64MiB")
    check_layout_fits(settings_for("2GiB", "64MiB"), where="w")


def test_check_layout_fits_hint_names_the_smallest_sufficient_size() -> None:
    with pytest.raises(ConfigError) as e:
        check_layout_fits(settings_for("300MiB"), where="f.toml [images.a] size")
    assert e.value.exit_code == 2
    assert e.value.message == (
        "f.toml [images.a] size: a 300MiB disk leaves 42.98MiB for the root "
        "filesystem after the 256MiB ESP"
    )
    assert e.value.hint == "set size to at least 514MiB"
    check_layout_fits(settings_for("514MiB"), where="w")
    with pytest.raises(ConfigError):
        check_layout_fits(settings_for("513MiB"), where="w")


def test_check_layout_fits_when_the_disk_is_smaller_than_the_esp() -> None:
    with pytest.raises(ConfigError) as e:
        check_layout_fits(settings_for("100MiB"), where="w")
    assert "leaves 0B for the root filesystem" in e.value.message
    assert e.value.hint == "set size to at least 514MiB"


def test_check_layout_fits_hint_is_sufficient_when_not_a_whole_unit() -> None:
    with pytest.raises(ConfigError) as e:
        check_layout_fits(settings_for("1GiB", "1003MiB"), where="w")
    hinted = e.value.hint.removeprefix("set size to at least ")
    assert parse_size(hinted, where="hint") >= 1261 * MiB


def test_disk_size_is_a_whole_number_of_sectors() -> None:
    layout = plan(size=parse_size("1.3GiB", where="size"))
    assert layout.size % 512 == 0


def test_a_layout_resized_keeps_its_partitions_and_uuids() -> None:
    from imagesmith.config.layout import disk_size_for, resized

    layout = plan_disk_layout(
        size=4 * 1024 * MiB, esp_size=256 * MiB, filesystem="btrfs", architecture="amd64",
        firmware=("bios", "uefi"), uuids=UuidSource("resize"),
    )  # fmt: skip
    need = 3000 * MiB
    small = resized(layout, disk_size_for(layout, need))
    assert small.root.size >= need and small.root.size - need < 2 * MiB
    assert small.size % MiB == 0 and small.size < layout.size
    assert [p.uuid for p in small.partitions] == [p.uuid for p in layout.partitions]
    assert small.partitions[:-1] == layout.partitions[:-1]
    assert small.root.end <= small.size - 33 * 512


def test_size_auto_is_accepted_for_the_disk_only() -> None:
    from imagesmith.config.settings import AUTO_SIZE, check_setting

    assert check_setting("size", "auto", where="w") == AUTO_SIZE
    with pytest.raises(ConfigError):
        check_setting("esp_size", "auto", where="w")


def test_btrfs_that_outgrows_its_partition_is_refused_not_spilled(tmp_path: Path) -> None:
    """mkfs.btrfs --rootdir makes the file bigger when the tree needs it; a
    fixed size must then fail, not write past the partition (the backup GPT)."""
    from imagesmith.disk.filesystems import make_btrfs_image

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(200 * MiB))
    layout = plan_disk_layout(
        size=400 * MiB, esp_size=64 * MiB, filesystem="btrfs", architecture="amd64",
        uuids=UuidSource("btrfs-fit"),
    )  # fmt: skip
    made = make_btrfs_image(tmp_path / "small.btrfs", layout.root, tree, size=120 * MiB)
    assert made > 120 * MiB  # what assemble_disk refuses with "raise size"
    shrunk = make_btrfs_image(tmp_path / "auto.btrfs", layout.root, tree, size=None)
    assert 200 * MiB < shrunk < 320 * MiB
