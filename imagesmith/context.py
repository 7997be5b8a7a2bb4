"""The build context: what every stage reads, and what stages pass on.

Each field below the inputs is written by one stage and read by later ones;
the comment says which.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from imagesmith.cache.entries import CacheUse
from imagesmith.cache.remote import RemoteCache
from imagesmith.config.layout import DiskLayout
from imagesmith.config.space import ResolvedImage


@dataclass
class BuildContext:
    image: ResolvedImage
    workdir: Path  # scratch space, removed after the build
    output_dir: Path
    cache_dir: Path  # shared by all builds: .debs, stage and initramfs entries
    layout: DiskLayout
    remote_cache: RemoteCache | None = None  # the registry the package stage is shared through
    timings: dict[str, float] = field(default_factory=dict)
    # What the build holds until its tree is no longer read: the overlay
    # mount of the cached tree and the entry's in-use lock. Closed before the
    # outputs are written, and on any failure.
    closing: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    # Where the disk is assembled: the raw output's temp file when the image
    # has a raw output (no copy), else a file in the workdir.
    disk_file: Path | None = None

    # bootstrap -> finalise (image sources), manifest
    mirror: str = ""
    # bootstrap -> finalise (hygiene scan), manifest: what must never ship
    secrets: list[bytes] = field(default_factory=list)
    build_repositories: list[str] = field(default_factory=list)
    # bootstrap, boot setup -> manifest
    stage_cache: CacheUse | None = None
    tree_overlay: bool = False  # bootstrap: the tree is the cached one, mounted (host/overlay.py)
    # bootstrap -> filesystem base, finalise: the stage entry the tree was
    # restored from; for a stage made from a parent stage (derived.py), the
    # parent's key: its cached btrfs and scan are what the build changes.
    tree_key: str = ""
    # bootstrap -> filesystem base: the package stage's tree as it stands in
    # the stage cache, and its key: what the cached btrfs is made from. When
    # the tree is mounted, its read-only lower layer (the stage's unpacked
    # tree, or after a stage cache miss the tree mmdebstrap just made, moved
    # aside: the cached btrfs is then made while the classes work).
    pristine_tree: Path | None = None
    pristine_key: str = ""
    initramfs_cache: CacheUse | None = None
    # filesystem base -> assemble: the cached btrfs of the package stage's tree,
    # the ctime mark after which the tree differs from it, and its copy being
    # made meanwhile (its size when done)
    filesystem_base: Path | None = None
    base_made: Future[Path] | None = None  # the entry, once made (at once on a hit)
    filesystem_cache: CacheUse | None = None  # -> manifest; hit: the root was made from it
    tree_mark: int = 0
    base_copy: Future[int] | None = None
    # The cached btrfs's metadata, retuned, to apply the changes to (disk/incremental.py).
    base_metadata: Future[Path | None] | None = None
    base_overlay: Path | None = None  # ...changed, to lay over the copy
    # boot setup -> manifest
    kernel_version: str = ""
    # finalise -> manifest
    packages: list[dict[str, str]] = field(default_factory=list)
    # outputs -> manifest
    outputs: dict[str, Path] = field(default_factory=dict)  # format -> temp file
    # assemble (the raw disk, hashed as the root was placed), outputs -> manifest
    output_sha256: dict[str, str] = field(default_factory=dict)  # format -> digest
    oci_manifest_digest: str = ""

    @property
    def tree(self) -> Path:
        """The image's root filesystem tree."""
        return self.workdir / "root"

    @property
    def overlay_scratch(self) -> Path:
        """Where the overlay of a mounted tree keeps the build's writes (host/overlay.py)."""
        return self.workdir / "overlay"

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
