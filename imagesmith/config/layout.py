"""Disk layout arithmetic: where each partition starts and ends.

Pure functions, no I/O. The layout is a GPT with 1 MiB alignment. The boot
partitions come first, as the image's firmware needs them, and the root
partition always comes last, so it can grow into the rest of a bigger disk:

| firmware    | partitions                            |
| ----------- | ------------------------------------- |
| uefi        | 1 esp, 2 root                         |
| bios        | 1 bios (BIOS boot), 2 root            |
| uefi + bios | 1 bios (BIOS boot), 2 esp, 3 root     |

The root partition runs from the end of the boot partitions to the last
4 KiB boundary before the backup GPT. That is where systemd-repart grows a
partition to, so on a disk of the image's own size first-boot growth has
nothing to do.

- The EFI system partition (FAT32) is `esp_size`.
- The BIOS boot partition (1 MiB, no filesystem) holds GRUB's core.img for
  a PC BIOS; boot.img in the protective MBR loads it (see biosboot.py).
- The root partition runs from the end of the boot partitions to the last
  aligned MiB before the backup GPT. It has the discoverable-partitions root
  type for the architecture, so systemd tools (systemd-repart, gpt-auto)
  recognise it.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from imagesmith.config.settings import AUTO_SIZE, ImageSettings, MiB, format_size
from imagesmith.errors import ConfigError

SECTOR = 512
ALIGN = MiB
# Primary GPT: protective MBR + header + 128 entries of 128 bytes = 34 sectors;
# 1 MiB free at the start covers it. The backup GPT at the end takes 33.
GPT_PRIMARY_SIZE = 34 * 512
GPT_BACKUP_SIZE = 33 * 512
# systemd-repart's grain: it grows a partition to the last 4 KiB boundary.
END_ALIGN = 4096
MIN_ROOT_SIZE = 256 * MiB
MIN_ESP_SIZE = 64 * MiB

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
# GRUB's core.img with the modules for GPT, ext4 and btrfs is well under 200 KiB.
BIOS_BOOT_SIZE = MiB
ROOT_TYPES = {"amd64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"}  # root-x86-64


@dataclass(frozen=True)
class Partition:
    number: int
    name: str  # GPT partition name
    type_uuid: str
    uuid: str  # PARTUUID
    start: int  # bytes from the start of the disk
    size: int  # bytes
    filesystem: str  # "vfat", "ext4", "btrfs", or "" (BIOS boot: raw core.img)
    fs_uuid: str
    label: str  # filesystem label

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def start_sector(self) -> int:
        return self.start // SECTOR

    @property
    def size_sectors(self) -> int:
        return self.size // SECTOR


@dataclass(frozen=True)
class DiskLayout:
    size: int
    disk_uuid: str
    partitions: tuple[Partition, ...]

    def partition(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)

    @property
    def esp(self) -> Partition:
        esp = self.partition("esp")
        if esp is None:
            raise LookupError("this layout has no EFI system partition")
        return esp

    @property
    def bios_boot(self) -> Partition | None:
        return self.partition("bios")

    @property
    def root(self) -> Partition:
        return self.partitions[-1]


def align_up(value: int, alignment: int = ALIGN) -> int:
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int = ALIGN) -> int:
    return value // alignment * alignment


DEFAULT_FIRMWARE = ("uefi",)


def check_layout_fits(settings: ImageSettings, *, where: str) -> None:
    """Fail (before any work) when the disk cannot hold the partitions."""
    firmware = settings.boot_firmware
    if "uefi" in firmware and settings.esp_size < MIN_ESP_SIZE:
        raise ConfigError(
            f"{where}: esp_size {format_size(settings.esp_size)} is below the "
            f"minimum {format_size(MIN_ESP_SIZE)}"
        )
    if settings.size == AUTO_SIZE:
        return  # sized from the tree at assembly
    root = root_partition_size(settings.size, settings.esp_size, firmware=firmware)
    if root < MIN_ROOT_SIZE:
        need = settings.size - root + MIN_ROOT_SIZE
        boot = []
        if "bios" in firmware:
            boot.append(f"{format_size(BIOS_BOOT_SIZE)} BIOS boot partition")
        if "uefi" in firmware:
            boot.append(f"{format_size(settings.esp_size)} ESP")
        raise ConfigError(
            f"{where}: a {format_size(settings.size)} disk leaves "
            f"{format_size(max(root, 0))} for the root filesystem after the "
            f"{' and the '.join(boot)}",
            hint=f"set size to at least {align_up(need) // MiB}MiB",
        )


def boot_partition_sizes(esp_size: int, firmware: tuple[str, ...]) -> list[tuple[str, int]]:
    """(name, size) of the partitions before the root, in disk order."""
    sizes = []
    if "bios" in firmware:
        sizes.append(("bios", BIOS_BOOT_SIZE))
    if "uefi" in firmware:
        sizes.append(("esp", align_up(esp_size)))
    return sizes


def root_partition_size(
    disk_size: int, esp_size: int, *, firmware: tuple[str, ...] = DEFAULT_FIRMWARE
) -> int:
    boot_end = ALIGN + sum(size for _, size in boot_partition_sizes(esp_size, firmware))
    root_end = align_down(disk_size - GPT_BACKUP_SIZE, END_ALIGN)
    return root_end - boot_end


def plan_disk_layout(
    *,
    size: int,
    esp_size: int,
    filesystem: str,
    architecture: str,
    firmware: tuple[str, ...] = DEFAULT_FIRMWARE,
    uuids: UuidSource | None = None,
) -> DiskLayout:
    """Place the boot partitions and the root partition on a disk of `size` bytes.

    The disk size is rounded up to a whole MiB, so the backup GPT sits on the
    last sector of what any consumer (QEMU, dd to a real disk) sees.
    """
    uuids = uuids or UuidSource()
    size = align_up(size)
    partitions: list[Partition] = []
    start = ALIGN
    for name, length in boot_partition_sizes(esp_size, firmware):
        esp = name == "esp"  # else the BIOS boot partition: raw core.img, no filesystem
        partitions.append(
            Partition(
                number=len(partitions) + 1,
                name=name,
                type_uuid=ESP_TYPE if esp else BIOS_BOOT_TYPE,
                uuid=uuids.next(),
                start=start,
                size=length,
                filesystem="vfat" if esp else "",
                fs_uuid=uuids.next_fat_serial() if esp else "",
                label="ESP" if esp else "",
            )
        )
        start += length
    root = Partition(
        number=len(partitions) + 1,
        name="root",
        type_uuid=ROOT_TYPES[architecture],
        uuid=uuids.next(),
        start=start,
        size=root_partition_size(size, esp_size, firmware=firmware),
        filesystem=filesystem,
        fs_uuid=uuids.next(),
        label="root",
    )
    return DiskLayout(size=size, disk_uuid=uuids.next(), partitions=(*partitions, root))


def disk_size_for(layout: DiskLayout, root_size: int) -> int:
    """The disk size whose root partition holds at least `root_size` bytes."""
    boot_end = layout.root.start
    return align_up(boot_end + align_up(root_size, END_ALIGN) + GPT_BACKUP_SIZE)


def resized(layout: DiskLayout, size: int) -> DiskLayout:
    """The same partitions and UUIDs on a disk of `size` bytes: only the root,
    the last partition, changes size."""
    size = align_up(size)
    root_end = align_down(size - GPT_BACKUP_SIZE, END_ALIGN)
    root = dataclasses.replace(layout.root, size=root_end - layout.root.start)
    return dataclasses.replace(layout, size=size, partitions=(*layout.partitions[:-1], root))


class UuidSource:
    """Random UUIDs by default; derived from a seed for reproducible output."""

    def __init__(self, seed: str = "") -> None:
        self.seed = seed
        self.count = 0

    def next(self) -> str:
        self.count += 1
        if self.seed:
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"imagesmith:{self.seed}:{self.count}"))
        return str(uuid.uuid4())

    def next_fat_serial(self) -> str:
        """A FAT volume ID: 8 hex digits, shown as XXXX-XXXX."""
        return self.next().replace("-", "")[:8]
