"""Apt repositories as classes declare them: `[[repositories]]` tables.

A repository with the same name in a later class replaces the earlier one.
Credentials are references (`env:NAME`, `file:/path` or `/path`), read only
at build time (tree/aptsources.py), never stored here.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesmith.config.tomlfile import check_keys, inside_space
from imagesmith.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
REPOSITORY_KEYS = {
    "name", "uri", "suites", "components", "signed_by", "keep",
    "client_cert", "client_key", "ca_cert", "auth",
}  # fmt: skip


@dataclass(frozen=True)
class Repository:
    name: str
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str  # path to a key file on the build host, or "" for none
    source: str  # "file: key" where it was defined, for error messages
    keep: bool = True  # the sources entry stays in the image (no credentials)
    client_cert: str = ""  # secret refs: env:NAME, file:/path or /path
    client_key: str = ""
    ca_cert: str = ""  # public CA file that signs the repository's server
    auth: str = ""  # auth.conf-style lines


def check_repository(repo: object, where: str, *, space: Path) -> dict[str, Any]:
    """A `[[repositories]]` table, checked; suites default later, per image.

    `signed_by` and `ca_cert` are public files: an absolute path is the
    config author's choice, a relative one is in the config space (and must
    stay there), so a key that travels with the config space is found from
    any working directory."""
    if not isinstance(repo, dict):
        raise ConfigError(f"{where}: expected a table")
    check_keys(
        repo, REPOSITORY_KEYS, where, hint=f"allowed keys: {', '.join(sorted(REPOSITORY_KEYS))}"
    )
    for key in ("name", "uri"):
        if not isinstance(repo.get(key), str) or not repo[key]:
            raise ConfigError(f"{where}: `{key}` is required and must be a string")
    if not NAME_RE.fullmatch(repo["name"]):
        raise ConfigError(
            f"{where}: `name` {repo['name']!r} is not a valid repository name",
            hint="it names files on the build host and in the image: letters, digits, "
            "'.', '_' and '-', starting with a letter or digit",
        )
    for key in ("suites", "components"):
        if key in repo and (
            not isinstance(repo[key], list) or not all(isinstance(v, str) for v in repo[key])
        ):
            raise ConfigError(f"{where}: `{key}` must be a list of strings")
    for key in ("signed_by", "ca_cert", "client_cert", "client_key", "auth"):
        if not isinstance(repo.get(key, ""), str):
            raise ConfigError(f"{where}: `{key}` must be a string")
    repo = dict(repo)
    for key in ("signed_by", "ca_cert"):  # public files, read on the build host
        if not repo.get(key):
            continue
        what = "signed_by key file" if key == "signed_by" else "ca_cert file"
        path = Path(repo[key])
        if not path.is_absolute():
            path = inside_space(space, space / path, f"{key} {repo[key]!r}")
        if not path.is_file():
            raise ConfigError(f"{where}: {what} {repo[key]!r} not found", hint=f"looked for {path}")
        repo[key] = str(path)
    if not isinstance(repo.get("keep", True), bool):
        raise ConfigError(f"{where}: `keep` must be true or false")
    return {**repo, "source": where}


def repository_from(table: dict[str, Any], *, default_suite: str) -> Repository:
    """A checked table as a Repository; `suites` defaults to the image's suite."""
    return Repository(
        name=table["name"],
        uri=table["uri"],
        suites=tuple(table.get("suites", [default_suite])),
        components=tuple(table.get("components", ["main"])),
        signed_by=table.get("signed_by", ""),
        source=table["source"],
        keep=table.get("keep", True),
        client_cert=table.get("client_cert", ""),
        client_key=table.get("client_key", ""),
        ca_cert=table.get("ca_cert", ""),
        auth=table.get("auth", ""),
    )


def check_one_tls_identity_per_host(repositories: tuple[Repository, ...]) -> None:
    """apt takes TLS options per host (Acquire::https::HOST::SslCert): two
    repositories on one host with different certificates would silently
    share the last one's."""
    seen: dict[str, Repository] = {}
    for repo in repositories:
        host = urllib.parse.urlsplit(repo.uri).hostname or ""
        identity = (repo.client_cert, repo.client_key, repo.ca_cert)
        other = seen.setdefault(host, repo)
        if (other.client_cert, other.client_key, other.ca_cert) != identity:
            raise ConfigError(
                f"{repo.source}: repository {repo.name!r} and {other.name!r} ({other.source}) "
                f"are both on {host} with different client_cert, client_key or ca_cert",
                hint="apt sets TLS options per host: give both the same ones, or reach "
                "them under different host names",
            )
