"""The build context: what every stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesmith.config import ResolvedImage
from imagesmith.layout import DiskLayout


@dataclass
class BuildContext:
    image: ResolvedImage
    workdir: Path  # scratch space, removed after the build
    output_dir: Path
    cache_dir: Path  # shared by all builds: .debs
    layout: DiskLayout
    timings: dict[str, float] = field(default_factory=dict)
    # Filled in as the stages run.
    kernel_version: str = ""
    packages: list[dict[str, str]] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)  # format -> temp file
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the disk is assembled: the raw output's temp file when the image
    # has a raw output (no copy), else a file in the workdir.
    disk_file: Path | None = None

    @property
    def tree(self) -> Path:
        """The image's root filesystem tree."""
        return self.workdir / "root"

    @property
    def esp_tree(self) -> Path:
        return self.workdir / "esp"

    @property
    def bios_dir(self) -> Path:
        """GRUB's boot.img and core.img for a PC BIOS, placed by the assemble stage."""
        return self.workdir / "bios"

    @property
    def rootfs_tar(self) -> Path:
        """A container image's root filesystem as one uncompressed tar."""
        return self.workdir / "rootfs.tar"

    @property
    def disk(self) -> Path:
        return self.disk_file or self.workdir / "disk.raw"

    @property
    def deb_cache(self) -> Path:
        s = self.image.settings
        return self.cache_dir / "debs" / f"{s.suite}-{s.architecture}"
