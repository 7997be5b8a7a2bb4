"""Secure Boot for real: build the distribution's signed chain, read its
signatures offline, boot it with Secure Boot enforced, and show that an
altered binary is refused.

One image, built once: the example server as a hybrid (UEFI and BIOS) with
secure_boot = "distribution". OVMF has Microsoft's keys enrolled
(OVMF_VARS_4M.ms.fd), so the chain is Microsoft UEFI CA -> Debian's shim ->
Debian Secure Boot CA -> GRUB and the kernel.

The refusal test changes one byte of the DOS stub ("DOS" -> "dOS") of a
signed binary on a copy of the ESP, with mtools. The loader never runs
that stub, so a firmware that checked nothing would boot the copy to the
end, and the test, which insists on the refusal, would fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagesmith.errors import BuildError
from imagesmith.host.signing import sign_pe, signing_key
from tests.conftest import EXAMPLES, imagesmith

pytestmark = [pytest.mark.build]

SECURE_BOOT_IMAGE = """
[images.secureboot]
description = "The server under UEFI Secure Boot (the distribution's chain), hybrid"
classes = ["base", "uefi", "bios", "example"]
secure_boot = "distribution"
outputs = ["raw"]
"""
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DOS_STUB = b"This program cannot be run in DOS mode"
BOOT_TIMEOUT = 900  # TCG on a busy two-core machine: a boot took 277 s once


OWN_KEYS_IMAGE = """
[images.secureboot-own]
description = "The server under UEFI Secure Boot with our own key behind shim (a MOK)"
classes = ["base", "uefi", "example"]
secure_boot = "own"
secure_boot_keys = "{keys}"
outputs = ["raw"]
"""


UKI_IMAGE = """
[images.secureboot-uki]
description = "The server as a unified kernel image signed with our own key, trusted in db"
classes = ["base", "uefi", "example"]
secure_boot = "own"
secure_boot_keys = "{keys}"
uki = true
outputs = ["raw"]
"""


def build_one(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    table: str,
    env: dict[str, str] | None = None,
) -> Path:
    space = tmp_path_factory.mktemp(f"{name}-space") / "space"
    shutil.copytree(EXAMPLES, space, symlinks=True)
    with (space / "imagesmith.toml").open("a") as f:
        f.write(table)
    out = tmp_path_factory.mktemp(f"{name}-out")
    result = imagesmith("-v", "build", "-C", space, "-o", out, name, timeout=1800, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    (out / "build.log").write_text(result.stderr)
    return out / f"{name}.raw"


@pytest.fixture(scope="session")
def secure_boot_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_one(tmp_path_factory, "secureboot", SECURE_BOOT_IMAGE)


@pytest.fixture(scope="session")
def own_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("secure-boot-keys") / "keys"
    result = imagesmith("keys", keys, "--name", "imagesmith test key")
    assert result.returncode == 0, result.stderr
    assert (keys / "db.key").stat().st_mode & 0o777 == 0o600
    return keys


TOKEN_PIN = "imagesmith-token-pin-5b1e7c"


@dataclass(frozen=True)
class Token:
    keys: Path  # db.crt and db.pkcs11, no db.key
    env: dict[str, str]  # SOFTHSM2_CONF and the PIN, for a build


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory, own_keys: Path) -> Token:
    """A SoftHSM token holding the own_keys private key: the key set a build
    sees has no private key, only the PKCS#11 URI of the key in the token."""
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    softhsm = ["softhsm2-util", "--pin", TOKEN_PIN]
    subprocess.run([*softhsm, "--init-token", "--free", "--label", "fleet", "--so-pin",
                    "so-pin-for-the-test"], env=env, check=True, capture_output=True)  # fmt: skip
    pkcs8 = base / "db.p8"
    subprocess.run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", own_keys / "db.key",
                    "-out", pkcs8], check=True, capture_output=True)  # fmt: skip
    subprocess.run([*softhsm, "--import", pkcs8, "--token", "fleet", "--label", "db", "--id",
                    "01"], env=env, check=True, capture_output=True)  # fmt: skip
    pkcs8.unlink()
    keys = base / "keys"
    keys.mkdir()
    shutil.copyfile(own_keys / "db.crt", keys / "db.crt")
    (keys / "db.pkcs11").write_text("pkcs11:token=fleet;object=db;type=private\n")
    return Token(keys, {"SOFTHSM2_CONF": str(conf), "IMAGESMITH_PKCS11_PIN": TOKEN_PIN})


@pytest.fixture(scope="session")
def own_keys_image(tmp_path_factory: pytest.TempPathFactory, token: Token) -> Path:
    """Signed through the token: the boot test below proves that path."""
    table = OWN_KEYS_IMAGE.format(keys=token.keys)
    return build_one(tmp_path_factory, "secureboot-own", table, env={**os.environ, **token.env})


def esp_image(disk: Path) -> str:
    """mtools' name for the ESP inside the disk file: FILE@@OFFSET."""
    table = json.loads(
        subprocess.run(["sfdisk", "-J", disk], capture_output=True, text=True, check=True).stdout
    )["partitiontable"]
    esp = next(p for p in table["partitions"] if p["type"].upper() == ESP_TYPE)
    return f"{disk}@@{esp['start'] * table.get('sectorsize', 512)}"


def altered_copy(image: Path, binary: str, tmp_path: Path) -> Path:
    """A copy of the image (and its manifest) with one byte of ESP:/EFI/BOOT/BINARY changed."""
    copy = tmp_path / "altered.raw"
    subprocess.run(["cp", "--sparse=always", image, copy], check=True)
    shutil.copyfile(image.with_suffix(".manifest.json"), tmp_path / "altered.manifest.json")
    extracted = tmp_path / binary
    esp = esp_image(copy)
    subprocess.run(["mcopy", "-n", "-i", esp, f"::/EFI/BOOT/{binary}", extracted], check=True)
    data = bytearray(extracted.read_bytes())
    stub = data.find(DOS_STUB, 0, 0x80)  # before the PE header at 0x80
    assert stub > 0, f"no DOS stub in {binary}"
    data[stub + DOS_STUB.index(b"DOS")] = ord("d")
    extracted.write_bytes(bytes(data))
    subprocess.run(["mcopy", "-o", "-i", esp, extracted, f"::/EFI/BOOT/{binary}"], check=True)
    return copy


def test_verify_names_who_signed_the_boot_path(secure_boot_image: Path) -> None:
    result = imagesmith("verify", secure_boot_image, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    shim = next(line for line in lines if "ESP:/EFI/BOOT/BOOTX64.EFI" in line)
    assert "signed; " in shim and "(issued by CN=Microsoft Corporation UEFI CA 2011)" in shim
    grub = next(line for line in lines if "ESP:/EFI/BOOT/grubx64.efi" in line)
    assert "signed; " in grub and "(issued by CN=Debian Secure Boot CA)" in grub
    kernel = next(line for line in lines if "/boot/vmlinuz-" in line)
    assert "signed; " in kernel and "(issued by CN=Debian Secure Boot CA)" in kernel
    manifest = json.loads(secure_boot_image.with_suffix(".manifest.json").read_text())
    assert manifest["settings"]["secure_boot"] == "distribution"
    assert manifest["firmware"] == ["uefi", "bios"]


@pytest.mark.boot
def test_distribution_chain_boots_with_secure_boot_enforced(
    secure_boot_image: Path, tmp_path: Path
) -> None:
    report, console = tmp_path / "report.json", tmp_path / "console.log"
    # No --firmware: the manifest says secure_boot, so uefi-secureboot.
    result = imagesmith(
        "test", secure_boot_image, "--timeout", str(BOOT_TIMEOUT), "--report", report,
        "--console-log", console, timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert ", uefi-secureboot, " in result.stdout.splitlines()[0]
    # The signed GRUB found the root through $cmdpath, not the fs UUID fallback.
    text = console.read_bytes().decode(errors="replace")
    assert "Booting `secureboot (Debian" in text
    assert "no regexp in this GRUB" not in text
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert checks["secure-boot-on"]["passed"]
    output = "\n".join(checks["secure-boot-on"]["output"])
    assert "SecureBoot EFI variable: 1" in output
    assert "SecureBoot enabled" in output  # mokutil --sb-state
    assert "[integrity]" in output  # the kernel locked itself down


@pytest.mark.boot
@pytest.mark.parametrize(
    ("binary", "refusal"),
    [
        ("BOOTX64.EFI", r"BdsDxe: failed to load Boot\d+ .*: Access Denied"),
        ("grubx64.efi", r"Verification failed: \(0x1A\) Security Violation"),
    ],
    ids=["shim-refused-by-firmware", "grub-refused-by-shim"],
)
def test_altered_binary_is_refused(
    secure_boot_image: Path, tmp_path: Path, binary: str, refusal: str
) -> None:
    altered = altered_copy(secure_boot_image, binary, tmp_path)
    # Offline, the change is in what the signature covers.
    verify = imagesmith("verify", altered, timeout=300)
    assert verify.returncode == 1
    assert f"unsigned-boot-binary: ESP:/EFI/BOOT/{binary}: does not match its signature" in (
        verify.stdout
    )
    result = imagesmith(
        "test", altered, "--firmware", "uefi-secureboot", "--timeout", str(BOOT_TIMEOUT),
        timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "Secure Boot refused to start the boot path" in result.stdout, result.stdout
    assert re.search(rf"refused: .*{refusal}", result.stdout), result.stdout
    seconds = int(re.search(r"\((\d+)s, uefi-secureboot", result.stdout).group(1))  # type: ignore[union-attr]
    assert seconds < BOOT_TIMEOUT / 3  # the refusal ends the test, not the timeout


def private_key_lines(keys: Path) -> list[bytes]:
    """The base64 lines of the private key, each a needle no image may hold."""
    lines = (keys / "db.key").read_bytes().splitlines()
    return [line for line in lines if line and not line.startswith(b"-----")]


def test_own_key_signs_grub_and_kernel_and_never_ships(
    own_keys_image: Path, own_keys: Path
) -> None:
    result = imagesmith("verify", own_keys_image, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    ours = "CN=imagesmith test key (issued by CN=imagesmith test key)"
    grub = next(line for line in lines if "ESP:/EFI/BOOT/grubx64.efi" in line)
    assert "signed; " in grub and ours in grub
    kernel = next(line for line in lines if "/boot/vmlinuz-" in line)
    assert ours in kernel
    # Not a line of the private key anywhere on the disk or in the manifest.
    needles = private_key_lines(own_keys)
    manifest = own_keys_image.with_suffix(".manifest.json").read_bytes()
    assert not any(n in manifest for n in needles)
    # Nor the token's PIN, which the build had; nor in the build's verbose log.
    needles.append(TOKEN_PIN.encode())
    assert TOKEN_PIN not in (own_keys_image.parent / "build.log").read_text()
    assert "--engine pkcs11" in (own_keys_image.parent / "build.log").read_text()
    with own_keys_image.open("rb") as disk:
        overlap = b""
        while chunk := disk.read(64 * 1024 * 1024):
            window = overlap + chunk
            assert not any(n in window for n in needles)
            overlap = chunk[-128:]


def test_a_key_file_and_a_token_sign_alike_and_a_wrong_pin_fails(
    own_keys_image: Path, own_keys: Path, token: Token, tmp_path: Path
) -> None:
    grub = tmp_path / "grubx64.efi"
    esp = esp_image(own_keys_image)
    subprocess.run(["mcopy", "-n", "-i", esp, "::/EFI/BOOT/grubx64.efi", grub], check=True)
    sign_pe(grub, key=signing_key(own_keys))
    verified = subprocess.run(
        ["sbverify", "--cert", own_keys / "db.crt", grub], capture_output=True
    )
    assert verified.returncode == 0, verified.stderr
    os.environ.update(token.env)
    try:
        sign_pe(grub, key=signing_key(token.keys))
        os.environ["IMAGESMITH_PKCS11_PIN"] = "not-the-pin"
        with pytest.raises(BuildError, match="sbsign grubx64.efi") as failed:
            sign_pe(grub, key=signing_key(token.keys))
        assert "not-the-pin" not in failed.value.message
    finally:
        for name in token.env:
            os.environ.pop(name, None)
    verified = subprocess.run(
        ["sbverify", "--cert", own_keys / "db.crt", grub], capture_output=True
    )
    assert verified.returncode == 0, verified.stderr
    other = tmp_path / "other"
    assert imagesmith("keys", other, "--name", "another key").returncode == 0
    assert (
        subprocess.run(
            ["sbverify", "--cert", other / "db.crt", grub], capture_output=True
        ).returncode
        != 0
    )


@pytest.mark.boot
def test_own_key_boots_as_a_mok_and_is_refused_without_it(
    own_keys_image: Path, own_keys: Path, tmp_path: Path
) -> None:
    # Without the MOK, shim trusts nothing that signed our GRUB.
    refused = boots_trusting_then_refused(own_keys_image, "--mok", own_keys / "db.crt", tmp_path)
    assert re.search(r"refused: .*Verification failed", refused), refused


def boots_trusting_then_refused(image: Path, flag: str, cert: Path, tmp_path: Path) -> str:
    """Boot `image` with `flag CERT` (it must reach multi-user with Secure
    Boot on), then without (it must fail); the second run's output."""
    report = tmp_path / "report.json"
    result = imagesmith(
        "test", image, flag, cert, "--timeout", str(BOOT_TIMEOUT),
        "--report", report, timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert "SecureBoot EFI variable: 1" in "\n".join(checks["secure-boot-on"]["output"])
    result = imagesmith("test", image, "--timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT + 120)
    assert result.returncode == 1, result.stdout
    return result.stdout


@pytest.fixture(scope="session")
def uki_image(tmp_path_factory: pytest.TempPathFactory, own_keys: Path) -> Path:
    """Signed with the key file: the token path is the MOK image's."""
    return build_one(tmp_path_factory, "secureboot-uki", UKI_IMAGE.format(keys=own_keys))


def test_uki_is_the_whole_uefi_path_and_signed_by_our_key(uki_image: Path) -> None:
    result = imagesmith("verify", uki_image, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    uki = next(line for line in result.stdout.splitlines() if "ESP:/EFI/BOOT/BOOTX64.EFI" in line)
    assert "(unified kernel image): signed; " in uki
    assert "CN=imagesmith test key (issued by CN=imagesmith test key)" in uki
    listing = subprocess.run(
        ["mdir", "-b", "-i", esp_image(uki_image), "::/EFI/BOOT"], capture_output=True, text=True
    )
    assert listing.stdout.split() == ["::/EFI/BOOT/BOOTX64.EFI"], "no shim, no GRUB"


@pytest.mark.boot
def test_uki_boots_with_our_certificate_in_db_and_is_refused_without(
    uki_image: Path, own_keys: Path, tmp_path: Path
) -> None:
    # Microsoft's keys alone do not trust our key: the firmware refuses it.
    refused = boots_trusting_then_refused(uki_image, "--db", own_keys / "db.crt", tmp_path)
    assert re.search(r"refused: .*Access Denied", refused), refused
