"""Secure Boot, read offline: is the boot path of an image signed, and by whom?

The boot path of a Secure Boot image (stages/bootsetup.py) is
EFI/BOOT/BOOTX64.EFI (shim) and EFI/BOOT/grubx64.efi on the ESP, and the
kernel, /boot/vmlinuz-*, in the root; with `uki = true`, BOOTX64.EFI alone,
a unified kernel image. For each, two questions:

- Does the file still match its signature? The Authenticode SHA-256 of the
  PE file (the whole file but its checksum, the certificate table's
  directory entry and the table itself) is computed here and looked for in
  the signature's signed data, which holds it. One changed byte anywhere
  else in the file, and it is no longer there: OVMF or shim would refuse it.
- Who signed it? `sbverify --list` (sbsigntool) names each signature's
  certificates, subject and issuer.

Whether the firmware trusts the signer is the firmware's business: this
reads no db. An unsigned binary on the path, or one that no longer matches
its signature, is the finding `unsigned-boot-binary`.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from imagesmith.host.run import require_tools, run

ESP_BOOT_PATH = ("EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi")
PE32_PLUS = 0x20B
CERTIFICATE_TABLE = 4  # index of the data directory entry


@dataclass(frozen=True)
class BootBinary:
    path: str  # as the firmware sees it, "ESP:/EFI/BOOT/BOOTX64.EFI" or "/boot/vmlinuz-..."
    signed: bool  # has a certificate table
    intact: bool  # its Authenticode digest is in the signature
    signers: tuple[str, ...]  # "subject (issuer)" of each signing certificate

    def line(self) -> str:
        if not self.signed:
            return f"{self.path}: not signed"
        state = "signed" if self.intact else "signed, but altered since: the digest does not match"
        return f"{self.path}: {state}; " + "; ".join(self.signers or ("no signer listed",))


def u16(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", data, at)[0])


def u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0])


def certificate_table(data: bytes) -> tuple[int, int, int]:
    """(directory entry offset, table offset, table size) of a PE file."""
    optional = u32(data, 0x3C) + 4 + 20
    directories = optional + (112 if u16(data, optional) == PE32_PLUS else 96)
    entry = directories + 8 * CERTIFICATE_TABLE
    return entry, u32(data, entry), u32(data, entry + 4)


def authenticode_sha256(data: bytes) -> bytes:
    """The PE image hash Authenticode signs (Microsoft's PE/COFF spec, appendix).

    Headers without the checksum and the certificate table's directory entry,
    then each section's raw data in file order, then what follows the last
    section but the certificate table.
    """
    if data[:2] != b"MZ" or data[u32(data, 0x3C) : u32(data, 0x3C) + 4] != b"PE\0\0":
        raise ValueError("not a PE file")
    coff = u32(data, 0x3C) + 4
    sections, optional_size = u16(data, coff + 2), u16(data, coff + 16)
    optional = coff + 20
    checksum = optional + 64
    entry, table, table_size = certificate_table(data)
    headers_end = u32(data, optional + 60)
    digest = hashlib.sha256()
    digest.update(data[:checksum])
    digest.update(data[checksum + 4 : entry])
    digest.update(data[entry + 8 : headers_end])
    raw = []
    for i in range(sections):
        header = optional + optional_size + 40 * i
        size, pointer = u32(data, header + 16), u32(data, header + 20)
        if size:
            raw.append((pointer, size))
    end = headers_end
    for pointer, size in sorted(raw):
        digest.update(data[pointer : pointer + size])
        end = max(end, pointer + size)
    tail_end = table if table_size and table >= end else len(data)
    digest.update(data[end:tail_end])
    return digest.digest()


def pe_section(data: bytes, name: str) -> bytes:
    """The raw data of the PE section `name` (such as ".sbat"), b"" without one."""
    coff = u32(data, 0x3C) + 4
    sections, optional_size = u16(data, coff + 2), u16(data, coff + 16)
    for i in range(sections):
        header = coff + 20 + optional_size + 40 * i
        if data[header : header + 8].rstrip(b"\0") == name.encode():
            size, pointer = u32(data, header + 16), u32(data, header + 20)
            return data[pointer : pointer + size]
    return b""


def signature_matches(data: bytes) -> bool:
    """True when the file's Authenticode digest is in its certificate table."""
    _, table, size = certificate_table(data)
    if not size:
        return False
    return authenticode_sha256(data) in data[table : table + size]


def list_signers(path: Path) -> tuple[str, ...]:
    """Each signature's signing certificate, 'CN=subject (issued by CN=issuer)'.

    From `sbverify --list`: per signature, its issuer, then the certificates
    it carries; the signer is the one that issuer issued.
    """
    out = run(["sbverify", "--list", os.fspath(path)], capture=True, check=False).stdout
    signers = []
    for block in re.split(r"^signature \d+$", out.decode(errors="replace"), flags=re.MULTILINE):
        issuers = re.findall(r"^image signature issuers:\n\s*- (.+)$", block, re.MULTILINE)
        certificates = re.findall(r"^\s*- subject:\s*(.+)\n\s*issuer:\s*(.+)$", block, re.MULTILINE)
        for subject, issuer in certificates:
            if issuers and issuer.strip() == issuers[0].strip():
                signers.append(f"{common_name(subject)} (issued by {common_name(issuer)})")
                break
    return tuple(signers)


def common_name(name: str) -> str:
    """'/C=US/O=Microsoft Corporation/CN=Microsoft UEFI CA' -> 'CN=Microsoft UEFI CA'."""
    match = re.search(r"CN=([^/]+)", name)
    return f"CN={match.group(1).strip()}" if match else name.strip()


def inspect_binary(path: Path, shown_as: str) -> BootBinary:
    data = path.read_bytes()
    try:
        _, _, size = certificate_table(data)
        intact = signature_matches(data)
    except (ValueError, struct.error):
        return BootBinary(shown_as, signed=False, intact=False, signers=())
    signers = list_signers(path) if size else ()
    return BootBinary(shown_as, signed=bool(size), intact=intact, signers=signers)


def is_uki(path: Path) -> bool:
    try:
        return path.is_file() and bool(pe_section(path.read_bytes(), ".linux"))
    except (OSError, ValueError, struct.error):
        return False


def boot_path_binaries(esp: Path, tree: Path) -> list[BootBinary]:
    """The image's Secure Boot path: shim and GRUB on the ESP, every kernel in
    /boot. A unified kernel image as BOOTX64.EFI (it has a .linux section) is
    the whole UEFI path: its one signature covers the kernel it holds."""
    require_tools("sbverify")
    found = []
    for rel in ESP_BOOT_PATH:
        path = esp / rel
        if rel == ESP_BOOT_PATH[0] and is_uki(path):
            found.append(inspect_binary(path, f"ESP:/{rel} (unified kernel image)"))
            break
        if path.is_file():
            found.append(inspect_binary(path, f"ESP:/{rel}"))
        else:
            found.append(BootBinary(f"ESP:/{rel}", signed=False, intact=False, signers=()))
    for kernel in sorted((tree / "boot").glob("vmlinuz-*")):
        found.append(inspect_binary(kernel, f"/boot/{kernel.name}"))
    return found
