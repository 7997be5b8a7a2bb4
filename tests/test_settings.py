"""Unit tests for the settings table: sizes, per-setting checks and merging."""

from __future__ import annotations

import dataclasses

import pytest

from imagesmith.config.settings import (
    SETTINGS_BY_NAME,
    GiB,
    MiB,
    check_setting,
    format_size,
    merge_settings,
    parse_size,
)
from imagesmith.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GiB),
        ("512MiB", 512 * MiB),
        ("512M", 512 * MiB),
        ("512MB", 512 * MiB),
        ("1.5G", 3 * GiB // 2),
        ("4KiB", 4096),
        ("1T", 1024 * GiB),
        ("2gib", 2 * GiB),
        (" 2 GiB ", 2 * GiB),
        ("10B", 10),
        ("4096", 4096),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_units_as_powers_of_1024(text: object, expected: int) -> None:
    assert parse_size(text, where="test") == expected


@pytest.mark.parametrize(
    "bad",
    ["", "two", "2 GiB x", "2XiB", "2Gi", "1.5.2G", "-1G", "0", "0MiB", 0, -5, True, 1.5, None, []],
)
def test_parse_size_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_size(bad, where="imagesmith.toml:7: [defaults] size")
    assert e.value.exit_code == 2
    assert e.value.message.startswith("imagesmith.toml:7: [defaults] size: ")
    assert repr(bad) in e.value.message


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (2 * GiB, "2GiB"),
        (300 * MiB, "300MiB"),
        (3 * GiB // 2, "1.50GiB"),
        (1536, "1.50KiB"),
        (1024, "1KiB"),
        (512, "512B"),
        (0, "0B"),
    ],
)
def test_format_size(number: int, expected: str) -> None:
    assert format_size(number) == expected


@pytest.mark.parametrize("number", [GiB, 3 * GiB, 256 * MiB, 64 * 1024])
def test_format_size_of_whole_units_parses_back(number: int) -> None:
    assert parse_size(format_size(number), where="test") == number


def test_check_setting_rejects_unknown_setting_with_hint() -> None:
    with pytest.raises(ConfigError) as e:
        check_setting("hostnme", "x", where="f.toml:3: [defaults] hostnme")
    assert e.value.message == "f.toml:3: [defaults] hostnme: unknown setting 'hostnme'"
    assert "hostname" in e.value.hint
    assert "kernel_cmdline" in e.value.hint


@pytest.mark.parametrize(
    ("name", "value", "expected_words"),
    [
        ("hostname", 5, "expected a string, got 5"),
        ("components", "main", "expected a list of strings, got 'main'"),
        ("components", ["main", 1], "expected a list of strings"),
        ("kernel_cmdline", "quiet", "expected a list of strings"),
        ("size", "huge", "expected a size"),
        ("filesystem", "xfs", "'xfs' is not one of ext4, btrfs"),
        ("filesystem", 4, "4 is not one of ext4, btrfs"),
        ("architecture", "arm64", "'arm64' is not one of amd64"),
        ("outputs", ["raw", "iso"], "'iso' is not one of raw, raw.zst, qcow2, oci, tar"),
        ("outputs", "raw", "expected a list of strings"),
    ],
)
def test_check_setting_rejects_wrong_type_or_choice(
    name: str, value: object, expected_words: str
) -> None:
    with pytest.raises(ConfigError) as e:
        check_setting(name, value, where=f"where: {name}")
    assert e.value.message.startswith(f"where: {name}: ")
    assert expected_words in e.value.message


def test_check_setting_normalises_values() -> None:
    assert check_setting("size", "3GiB", where="w") == 3 * GiB
    assert check_setting("esp_size", 128 * MiB, where="w") == 128 * MiB
    assert check_setting("outputs", ["qcow2", "raw"], where="w") == ["qcow2", "raw"]
    assert check_setting("filesystem", "btrfs", where="w") == "btrfs"
    assert check_setting("kernel_cmdline", [], where="w") == []


def test_merge_settings_without_layers_gives_the_defaults() -> None:
    s = merge_settings([])
    assert s.suite == "trixie"
    assert s.size == 2 * GiB
    assert s.esp_size == 256 * MiB
    assert s.filesystem == "ext4"
    assert s.components == ("main",)
    assert s.outputs == ("raw",)
    assert s.kernel_cmdline == ()
    assert s.serial_console == "ttyS0,115200"


def test_merge_settings_later_scalar_wins() -> None:
    s = merge_settings(
        [
            {"hostname": "first", "filesystem": "btrfs", "size": 4 * GiB},
            {"hostname": "second"},
            {"size": 3 * GiB},
        ]
    )
    assert s.hostname == "second"
    assert s.filesystem == "btrfs"
    assert s.size == 3 * GiB


def test_merge_settings_replaces_lists_that_are_not_append() -> None:
    s = merge_settings([{"components": ["main", "contrib"]}, {"components": ["non-free"]}])
    assert s.components == ("non-free",)


def test_merge_settings_kernel_cmdline_accumulates_in_order() -> None:
    assert SETTINGS_BY_NAME["kernel_cmdline"].merge == "append"
    s = merge_settings(
        [
            {"kernel_cmdline": ["quiet"]},
            {"hostname": "h"},
            {"kernel_cmdline": ["loglevel=3", "mitigations=off"]},
            {"kernel_cmdline": ["quiet"]},
        ]
    )
    assert s.kernel_cmdline == ("quiet", "loglevel=3", "mitigations=off", "quiet")


def test_merge_settings_leaves_the_table_defaults_alone() -> None:
    layer = {"kernel_cmdline": ["quiet"]}
    merge_settings([layer])
    assert merge_settings([]).kernel_cmdline == ()
    assert SETTINGS_BY_NAME["kernel_cmdline"].default == []
    assert layer == {"kernel_cmdline": ["quiet"]}


def test_merged_settings_are_frozen() -> None:
    s = merge_settings([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.hostname = "other"  # type: ignore[misc]
