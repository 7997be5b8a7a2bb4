"""The partition table: a GPT written by sfdisk on a plain file."""

from __future__ import annotations

import os
from pathlib import Path

from imagesmith.config.layout import DiskLayout
from imagesmith.host.run import run


def sfdisk_script(layout: DiskLayout) -> str:
    lines = ["label: gpt", f"label-id: {layout.disk_uuid}", "unit: sectors", ""]
    for p in layout.partitions:
        lines.append(
            f"start={p.start_sector}, size={p.size_sectors}, type={p.type_uuid}, "
            f'uuid={p.uuid}, name="{p.name}"'
        )
    return "\n".join(lines) + "\n"


def write_partition_table(disk: Path, layout: DiskLayout) -> None:
    """The GPT (and protective MBR) of `layout` in `disk`, made that long;
    what the file already holds elsewhere (a root placed early) stays."""
    with disk.open("ab") as f:
        f.truncate(layout.size)
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", os.fspath(disk)],
        input=sfdisk_script(layout).encode(),
        what="sfdisk",
    )
