"""Secure Boot without booting: the setting and its class, the ESP's GRUB
config, the QEMU firmware choice, and the PE signature reading on real
signed binaries (taken from a built image in tests/test_secure_boot.py;
here from a file made on the spot)."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest

from imagesmith.config.space import load_config_space, resolve_image
from imagesmith.errors import ConfigError
from imagesmith.host.signing import make_key_set
from imagesmith.inspect import qemu
from imagesmith.inspect.secureboot import authenticode_sha256, certificate_table, signature_matches
from imagesmith.stages.bootsetup import signed_grub_cfg_text
from tests.test_bootloader import make_context


def resolve(tmp_path: Path, classes: str, settings: str) -> object:
    space = tmp_path / "space"
    space.mkdir(exist_ok=True)
    (space / "imagesmith.toml").write_text(
        textwrap.dedent(
            f"""
            [images.vm]
            classes = {classes}
            {settings}
            """
        )
    )
    return resolve_image(load_config_space(space), "vm")


def test_secure_boot_adds_its_class_after_base(tmp_path: Path) -> None:
    image = resolve(tmp_path, '["base", "uefi", "bios"]', 'secure_boot = "distribution"')
    names = [c.name for c in image.classes]  # type: ignore[attr-defined]
    assert names.index("secure-boot") == 4  # after base and the first-boot classes
    secure = image.classes[4]  # type: ignore[attr-defined]
    assert secure.switched_by == "secure_boot"
    for package in ("shim-signed", "grub-efi-amd64-signed", "mokutil"):
        assert package in image.packages  # type: ignore[attr-defined]


def test_secure_boot_is_off_by_default(tmp_path: Path) -> None:
    image = resolve(tmp_path, '["base", "uefi"]', "")
    assert "secure-boot" not in [c.name for c in image.classes]  # type: ignore[attr-defined]


def test_secure_boot_needs_uefi(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"imagesmith.toml \[images.vm\]: secure_boot"):
        resolve(tmp_path, '["base", "bios"]', 'secure_boot = "distribution"')


def test_listing_the_class_without_the_setting_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='secure_boot = "off"') as error:
        resolve(tmp_path, '["base", "uefi", "secure-boot"]', "")
    assert 'secure_boot = "distribution"' in str(error.value.hint)


def test_unknown_secure_boot_mode_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not one of off, distribution"):
        resolve(tmp_path, '["base", "uefi"]', 'secure_boot = "yes"')


def test_esp_grub_cfg_finds_the_root_on_the_boot_disk(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, 'secure_boot = "distribution"')
    text = signed_grub_cfg_text(ctx)
    root = ctx.layout.root
    assert "regexp --set=1:imagesmith_disk '^([^,]+)' \"$root\"" in text
    assert f'set root="($imagesmith_disk,gpt{root.number})"' in text
    assert f"search --no-floppy --fs-uuid --set=root {root.fs_uuid}" in text  # fallback only
    assert text.endswith('configfile "$prefix/grub.cfg"\n')


def write_manifest(tmp_path: Path, firmware: list[str], secure_boot: str) -> Path:
    image = tmp_path / "vm.raw"
    image.write_bytes(b"")
    manifest = {"firmware": firmware, "settings": {"secure_boot": secure_boot}}
    (tmp_path / "vm.manifest.json").write_text(json.dumps(manifest))
    return image


def test_secure_boot_image_defaults_to_secure_boot_firmware(tmp_path: Path) -> None:
    image = write_manifest(tmp_path, ["uefi", "bios"], "distribution")
    assert qemu.pick_firmware(image, None) == "uefi-secureboot"
    assert qemu.pick_firmware(image, "bios") == "bios"
    assert qemu.pick_firmware(image, "uefi") == "uefi"


def test_any_uefi_image_may_boot_under_secure_boot(tmp_path: Path) -> None:
    image = write_manifest(tmp_path, ["uefi"], "off")
    assert qemu.pick_firmware(image, None) == "uefi"
    assert qemu.pick_firmware(image, "uefi-secureboot") == "uefi-secureboot"
    bios_only = write_manifest(tmp_path, ["bios"], "off")
    with pytest.raises(ConfigError, match="cannot boot under uefi-secureboot"):
        qemu.pick_firmware(bios_only, "uefi-secureboot")


def test_secure_boot_qemu_line_has_smm_and_a_secure_pflash(tmp_path: Path) -> None:
    code, variables = qemu.find_firmware(secure_boot=True)
    assert code.name.startswith("OVMF_CODE") and "secboot" in code.name
    argv = qemu.qemu_argv(
        disk=tmp_path / "d", disk_fmt="raw", firmware_code=code, firmware_vars=variables,
        accel="tcg", memory=1024, serial=[], secure_boot=True,
    )  # fmt: skip
    line = " ".join(argv)
    assert "-machine q35,smm=on,accel=tcg" in line
    assert "-global driver=cfi.pflash01,property=secure,value=on" in line
    assert "-global ICH9-LPC.disable_s3=1" in line
    plain = " ".join(qemu.qemu_argv(
        disk=tmp_path / "d", disk_fmt="raw", firmware_code=code, firmware_vars=variables,
        accel="tcg", memory=1024, serial=[],
    ))  # fmt: skip
    assert "smm=on" not in plain and "cfi.pflash01" not in plain


def tiny_signed_pe() -> bytes:
    """A PE32+ file of headers, one section and a certificate table that
    holds its Authenticode digest, as a signature's signed data would."""
    data = bytearray(0x400)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x80)
    data[0x80:0x84] = b"PE\0\0"
    coff = 0x84
    struct.pack_into("<HH", data, coff, 0x8664, 1)  # machine, one section
    struct.pack_into("<H", data, coff + 16, 240)  # size of the optional header
    optional = coff + 20
    struct.pack_into("<H", data, optional, 0x20B)
    struct.pack_into("<I", data, optional + 60, 0x200)  # size of headers
    section = optional + 240
    struct.pack_into("<II", data, section + 16, 0x200, 0x200)  # raw size, raw pointer
    data[0x200:0x400] = bytes(range(256)) * 2
    entry = optional + 112 + 8 * 4
    struct.pack_into("<II", data, entry, 0x400, 40)
    digest = authenticode_sha256(bytes(data) + bytes(40))
    return bytes(data) + b"\0" * 8 + digest


def test_a_changed_byte_no_longer_matches_the_signature() -> None:
    signed = tiny_signed_pe()
    assert certificate_table(signed)[1:] == (0x400, 40)
    assert signature_matches(signed)
    altered = bytearray(signed)
    altered[0x300] ^= 0xFF
    assert not signature_matches(bytes(altered))
    # The checksum is outside the digest: changing it keeps the signature.
    rechecksummed = bytearray(signed)
    rechecksummed[0x84 + 20 + 64] = 0x55
    assert signature_matches(bytes(rechecksummed))


def test_own_keys_need_a_key_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='secure_boot = "own" needs secure_boot_keys'):
        resolve(tmp_path, '["base", "uefi"]', 'secure_boot = "own"')
    keys = tmp_path / "keys"
    with pytest.raises(ConfigError, match=f"no {keys}/db.key"):
        resolve(tmp_path, '["base", "uefi"]', f'secure_boot = "own"\nsecure_boot_keys = "{keys}"')


def test_own_keys_must_not_live_in_the_config_space(tmp_path: Path) -> None:
    keys = tmp_path / "space" / "keys"
    keys.mkdir(parents=True)
    settings = f'secure_boot = "own"\nsecure_boot_keys = "{keys}"'
    with pytest.raises(ConfigError, match="inside the config space"):
        resolve(tmp_path, '["base", "uefi"]', settings)


def test_key_set_is_made_once_and_never_overwritten(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = make_key_set(keys, common_name="unit test key")
    assert [p.name for p in made] == ["db.key", "db.crt", "db.der"]
    assert (keys / "db.key").stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in (keys / "db.key").read_bytes()
    before = (keys / "db.key").read_bytes()
    with pytest.raises(ConfigError, match="never overwrites"):
        make_key_set(keys, common_name="unit test key")
    assert (keys / "db.key").read_bytes() == before


@pytest.mark.parametrize("where", ["mok", "db"])
def test_enrolment_needs_secure_boot_firmware(tmp_path: Path, where: str) -> None:
    image = write_manifest(tmp_path, ["uefi"], "own")
    enrolments = [qemu.Enrolment(where, tmp_path / "db.crt")]
    with pytest.raises(ConfigError, match=f"--{where} needs Secure Boot firmware"):
        with qemu.vm_scratch(image, in_place=True, firmware="uefi", enrolments=enrolments):
            pass


def test_uki_needs_uefi_and_not_the_distribution_chain(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="uki = true but the image boots under bios only"):
        resolve(tmp_path, '["base", "bios"]', "uki = true")
    with pytest.raises(ConfigError, match='uki = true with secure_boot = "distribution"'):
        resolve(tmp_path, '["base", "uefi"]', 'uki = true\nsecure_boot = "distribution"')
    image = resolve(tmp_path, '["base", "uefi"]', "uki = true")
    assert "uki" in image.class_names
