"""Where packages come from by default: the build host's apt sources.

With no `mirror` setting, the archive URI is taken from the build host's apt
configuration (one-line `.list` files and deb822 `.sources` files): the
first `deb` entry for a Debian release codename. We never hard-code an
archive host.
"""

from __future__ import annotations

from pathlib import Path

from imagesmith.errors import ConfigError

APT_DIR = Path("/etc/apt")
DEBIAN_SUITES = {
    "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    "stable", "testing", "unstable", "oldstable", "experimental",
}  # fmt: skip


def host_apt_entries(apt_dir: Path = APT_DIR) -> list[tuple[str, list[str]]]:
    """(uri, suites) of every enabled `deb` entry on the host, in apt's order."""
    entries: list[tuple[str, list[str]]] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        if path.suffix == ".list":
            entries += _parse_one_line(path.read_text())
        elif path.suffix == ".sources":
            entries += _parse_deb822(path.read_text())
    return entries


def _parse_one_line(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [signed-by=... arch=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            entries.append((words[0], [words[1]]))
    return entries


def _parse_deb822(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split()))
    return entries


def host_debian_mirror(apt_dir: Path = APT_DIR) -> str:
    for uri, suites in host_apt_entries(apt_dir):
        if any(s in DEBIAN_SUITES for s in suites):
            return uri
    raise ConfigError(
        f"no Debian archive found in the build host's apt sources under {apt_dir}",
        hint='set `mirror = "URI"` in [defaults] of imagesmith.toml',
    )


def archive_mirror(configured: str) -> str:
    """The `mirror` setting, or the build host's Debian archive when it is empty."""
    return configured or host_debian_mirror()
