"""GRUB for a PC BIOS, written straight into the disk file: no grub-bios-setup.

This does what grub-bios-setup does for a GPT disk with a BIOS boot
partition, on a plain file. grub-bios-setup itself fails on a whole-file loop
device, and imagesmith uses no loop device at all.

1. core.img, made by `grub-mkimage -O i386-pc` inside the image so it matches
   the image's own GRUB, goes to the start of the BIOS boot partition. Its
   first sector is diskboot.img, which loads the rest of core.img through the
   blocklist in its last 12 bytes (offset 500): start sector (u64), sector
   count (u16), load segment (u16), little-endian. grub-mkimage fills in the
   count and the segment. We set the start to the sector after core.img's
   first one. The entry before it (the list runs backwards) stays zero, the
   terminator.
2. boot.img goes into the protective MBR, boot code only. The partition
   table and everything from offset 440 on (disk signature, four entries,
   0x55AA) stay as sfdisk wrote them, and so does the BPB area (3..0x5a), as
   grub-bios-setup copies both from the disk. Three fields of boot.S are set:
   - 0x5c `kernel_sector`: the LBA of core.img's first sector (u64);
   - 0x64 `boot_drive`: 0xff, "use the drive the BIOS booted from (DL)";
   - 0x66 `boot_drive_check`: the short jump becomes two NOPs, as
     grub-bios-setup does for hard disks, so a BIOS that passes a bogus DL
     still boots from 0x80.

No Reed-Solomon codes are added (like `grub-install --no-rs-codes`): the
redundancy field stays 0 and the decompressor skips recovery.

The root partition is named in core.img's prefix relative to the boot disk,
`(,gptN)/boot/grub`, so nothing depends on filesystem UUIDs.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from imagesmith.config.layout import SECTOR, Partition
from imagesmith.errors import BuildError

# boot.S / include/grub/i386/pc/boot.h
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
DRIVE_CHECK = 0x66
MBR_KEEP_FROM = 0x1B8  # GRUB_BOOT_MACHINE_WINDOWS_NT_MAGIC: signature, table, 0x55AA
BOOT_DRIVE_FROM_BIOS = 0xFF
SHORT_JMP = 0xEB
NOP = 0x90
# diskboot.S: struct grub_boot_blocklist { u64 start; u16 len; u16 segment; }
BLOCKLIST = struct.Struct("<QHH")
FIRST_BLOCKLIST = SECTOR - BLOCKLIST.size
# GRUB_BOOT_I386_PC_KERNEL_SEG + one sector: where the rest of core.img loads.
REST_SEGMENT = 0x800 + (SECTOR >> 4)


def patch_boot_img(boot_img: bytes, mbr: bytes, core_sector: int) -> bytes:
    """boot.img as it goes into sector 0: pointing at core.img, keeping the MBR's table."""
    if len(boot_img) != SECTOR or boot_img[510:] != b"\x55\xaa":
        raise BuildError("boot.img is not a 512-byte boot sector")
    if len(mbr) != SECTOR:
        raise BuildError("the disk's first sector is not 512 bytes")
    if boot_img[DRIVE_CHECK] not in (SHORT_JMP, NOP):
        raise BuildError(
            f"boot.img has no boot drive check jump at {DRIVE_CHECK:#x}: unknown GRUB boot.img",
        )
    sector = bytearray(boot_img)
    sector[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
    sector[MBR_KEEP_FROM:] = mbr[MBR_KEEP_FROM:]
    struct.pack_into("<Q", sector, KERNEL_SECTOR, core_sector)
    sector[BOOT_DRIVE] = BOOT_DRIVE_FROM_BIOS
    sector[DRIVE_CHECK : DRIVE_CHECK + 2] = bytes((NOP, NOP))
    return bytes(sector)


def patch_core_img(core_img: bytes, core_sector: int) -> bytes:
    """core.img with its blocklist naming where its own sectors 1.. are on the disk."""
    if len(core_img) < 2 * SECTOR:
        raise BuildError(f"core.img is only {len(core_img)} bytes: not a GRUB i386-pc core image")
    rest = -(-len(core_img) // SECTOR) - 1
    _, length, segment = BLOCKLIST.unpack_from(core_img, FIRST_BLOCKLIST)
    if (length, segment) != (rest, REST_SEGMENT):
        raise BuildError(
            f"core.img's blocklist says {length} sectors at segment {segment:#x}, "
            f"expected {rest} at {REST_SEGMENT:#x}: not made by grub-mkimage -O i386-pc",
        )
    image = bytearray(core_img)
    BLOCKLIST.pack_into(image, FIRST_BLOCKLIST, core_sector + 1, rest, REST_SEGMENT)
    # The terminator: the entry before the first one (the list grows downwards).
    BLOCKLIST.pack_into(image, FIRST_BLOCKLIST - BLOCKLIST.size, 0, 0, 0)
    return bytes(image)


def install_bios_boot(disk: Path, bios_boot: Partition, boot_img: Path, core_img: Path) -> None:
    """Write core.img into the BIOS boot partition and boot.img into the MBR."""
    core = core_img.read_bytes()
    if len(core) > bios_boot.size:
        raise BuildError(
            f"core.img is {len(core)} bytes; the BIOS boot partition holds {bios_boot.size}",
        )
    core_sector = bios_boot.start_sector
    with disk.open("r+b") as f:
        mbr = os.pread(f.fileno(), SECTOR, 0)
        os.pwrite(f.fileno(), patch_core_img(core, core_sector), bios_boot.start)
        os.pwrite(f.fileno(), patch_boot_img(boot_img.read_bytes(), mbr, core_sector), 0)
