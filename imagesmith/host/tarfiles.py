"""Tar archives the build writes: every entry owned by root."""

from __future__ import annotations

import tarfile


def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A `tarfile` filter: the entry as root's, whoever owns it on the host."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
