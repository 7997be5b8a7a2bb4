"""Debian package names as classes give them: `name`, `name:arch`,
`name=version` or `name/release`."""

from __future__ import annotations

import re

# A Debian package name, optionally with :arch, and =version or /release.
PACKAGE_RE = re.compile(
    r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+|/[A-Za-z0-9.-]+)?$"
)


def package_name(spec: str) -> str:
    """'bash=5.2-1' -> 'bash'; also strips ':arch' and '/release'."""
    return re.split(r"[:=/]", spec, maxsplit=1)[0]
