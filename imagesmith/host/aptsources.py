"""Where packages come from by default: the build host's apt sources.

With no `mirror` setting, the archive URI is taken from the build host's apt
configuration (one-line `.list` files and deb822 `.sources` files): the
first `deb` entry for a Debian release codename. We never hard-code an
archive host.
"""

from __future__ import annotations

import urllib.parse
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


def apt_auth_for(auth_text: str, url: str) -> tuple[str, str] | None:
    """(login, password) that apt would send for `url` from an auth.conf text.

    apt_auth.conf(5), as apt's own parser reads it: the file is a stream of
    whitespace-separated tokens (a `#` starts no comment); the first
    `machine` entry that matches wins. An entry matches by host, by
    host:port (then only that port), or by host[:port]/path (a prefix of
    the URL's host[:port]/path). An entry without `protocol://` matches
    https URLs only; with one, only URLs of that protocol.
    """
    parts = urllib.parse.urlsplit(url)
    scheme, host, port = parts.scheme, parts.hostname or "", parts.port
    path = parts.path or "/"
    lookfor = f"{host}:{port}{path}" if port else f"{host}{path}"
    state, login, password = "", "", ""
    matched = False
    tokens = auth_text.split()
    for i, token in enumerate(tokens):
        if state == "machine":
            matched = _machine_matches(token, scheme, host, port, lookfor)
            state = "good" if matched else ""
        elif state == "good":
            if token == "machine":
                break
            if token in ("login", "password") and i + 1 < len(tokens):
                state = token
        elif state in ("login", "password"):
            login, password = (token, password) if state == "login" else (login, token)
            state = "good"
        elif token == "machine":
            state = "machine"
    return (login, password) if matched else None


def _machine_matches(token: str, scheme: str, host: str, port: int | None, lookfor: str) -> bool:
    if "://" in token:
        if not token.startswith(f"{scheme}://"):
            return False
        token = token.removeprefix(f"{scheme}://")
    elif scheme not in ("https", "tor+https"):
        return False  # apt sends credentials without a protocol only over TLS
    if "/" in token:
        return lookfor.startswith(token)
    host_port = lookfor.split("/", 1)[0]  # host, or host:port when the URL names one
    return token in (host, host_port)
