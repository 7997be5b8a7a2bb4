"""The partition table: a GPT written by sfdisk on a plain file."""

from __future__ import annotations

import os
from pathlib import Path

from imagesmith.config.layout import GPT_BACKUP_SIZE, GPT_PRIMARY_SIZE, DiskLayout
from imagesmith.disk.sparse import scratch_file
from imagesmith.host.run import run


def sfdisk_script(layout: DiskLayout) -> str:
    lines = ["label: gpt", f"label-id: {layout.disk_uuid}", "unit: sectors", ""]
    for p in layout.partitions:
        lines.append(
            f"start={p.start_sector}, size={p.size_sectors}, type={p.type_uuid}, "
            f'uuid={p.uuid}, name="{p.name}"'
        )
    return "\n".join(lines) + "\n"


def write_partition_table(disk: Path, layout: DiskLayout, *, scratch: Path | None = None) -> None:
    """The GPT (and protective MBR) of `layout` in `disk`, made that long;
    what the file already holds elsewhere (a root placed early) stays.

    sfdisk writes it on an empty file of the disk's size in `scratch` (the
    disk's directory by default), then its sectors are copied in: sfdisk
    probes and syncs the file it is given, which waits for a root still
    being copied into the disk (1.5 s for a desktop's), and it never reads
    the disk this way."""
    with disk.open("ab") as f:
        f.truncate(layout.size)
    with scratch_file(scratch or disk.parent, ".gpt-", layout.size) as table:
        run(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", os.fspath(table)],
            input=sfdisk_script(layout).encode(),
            what="sfdisk",
        )
        with table.open("rb") as source, disk.open("r+b") as target:
            for start, length in (
                (0, GPT_PRIMARY_SIZE),
                (layout.size - GPT_BACKUP_SIZE, GPT_BACKUP_SIZE),
            ):
                os.pwrite(target.fileno(), os.pread(source.fileno(), length, start), start)
