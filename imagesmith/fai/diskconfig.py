"""FAI's disk_config/CLASS (setup-storage syntax) mapped to imagesmith's layout.

setup-storage uses the disk_config file of the highest-priority class that
has one; so does this. imagesmith's layout is fixed: a GPT with an ESP (UEFI)
and/or a BIOS boot partition, then one root file system that grows on first
boot. From the FAI file it takes:

- `primary /boot/efi SIZE vfat` -> `esp_size`;
- the root partition's file system (`ext4` or `btrfs`) -> `filesystem`;
- `disklabel:`, `bootable:`, `fstabkey:`, mount options, swap and further
  partitions are noted: imagesmith writes a GPT, sets the flags its boot needs,
  mounts by UUID and makes one root file system.

`disk_config lvm`, `raid` and `cryptsetup`, and LUKS file systems, cannot be
mapped: they are rejected with the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from imagesmith.errors import ConfigError
from imagesmith.fai.report import Note

REJECTED = {"lvm": "LVM", "raid": "software RAID", "cryptsetup": "LUKS encryption"}
FILESYSTEMS = {"ext4", "btrfs"}
SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]i?B?)?")


@dataclass
class DiskMapping:
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)


def disk_config_for(space: Path, classes: tuple[str, ...]) -> Path | None:
    for name in reversed(classes):
        path = space / "disk_config" / name
        if path.is_file():
            return path
    return None


def esp_size(size: str) -> str | None:
    """The lower bound of a setup-storage size ('512', '512M-', '1G-2G')
    as an imagesmith size; FAI's sizes without a unit are MiB."""
    match = SIZE_RE.match(size)
    if not match:
        return None
    unit = (match.group(2) or "M")[0]
    return f"{match.group(1)}{unit}iB"


def map_partition(words: list[str], where: str, out: DiskMapping) -> None:
    mount, size = words[1], words[2] if len(words) > 2 else ""
    fstype = words[3] if len(words) > 3 else ""
    if fstype.startswith("luks"):
        raise ConfigError(f"{where}: {fstype} (LUKS) cannot be mapped to imagesmith's layout")
    if mount == "/boot/efi":
        mapped = esp_size(size)
        if mapped:
            out.settings["esp_size"] = mapped
        return
    if mount == "/":
        if fstype in FILESYSTEMS:
            out.settings["filesystem"] = fstype
        else:
            out.notes.append(Note(where, f"root file system {fstype}", "ext4"))
        if len(words) > 4 and words[4] not in ("rw", "defaults"):
            out.notes.append(Note(where, f"root mount options {words[4]}", "imagesmith's"))
        return
    what = "swap" if fstype == "swap" or mount == "swap" else f"partition {mount} ({fstype})"
    out.notes.append(Note(where, what, "not made: one root file system that grows"))


def map_disk_config(path: Path, label: str) -> DiskMapping:
    out = DiskMapping()
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        where = f"{label}:{number}"
        words = line.split()
        if not words:
            continue
        if words[0] == "disk_config":
            kind = words[1] if len(words) > 1 else ""
            if kind in REJECTED:
                raise ConfigError(
                    f"{where}: disk_config {kind}: {REJECTED[kind]} cannot be mapped to "
                    "imagesmith's layout (a GPT with one root file system)",
                    hint="build with a class list whose disk_config uses plain partitions",
                )
            if kind in ("tmpfs", "nfs"):
                out.notes.append(Note(where, f"disk_config {kind}", "not carried over"))
            for option in words[2:]:
                key, _, value = option.partition(":")
                if key == "disklabel" and value != "gpt":
                    out.notes.append(Note(where, f"disklabel:{value}", "a GPT, BIOS boot by class"))
                elif key in ("bootable", "fstabkey", "align-at", "preserve_always"):
                    out.notes.append(Note(where, option, "imagesmith's own (UUIDs, flags)"))
        elif words[0] in ("primary", "logical", "part"):
            map_partition(words, where, out)
        elif words[0] in ("vg", "raid0", "raid1", "raid5", "raid6", "raid10"):
            raise ConfigError(f"{where}: {words[0]} cannot be mapped to imagesmith's layout")
        else:
            out.notes.append(Note(where, words[0], "not understood; ignored"))
    return out
