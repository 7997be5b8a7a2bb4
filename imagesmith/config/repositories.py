"""Apt repositories as classes declare them: `[[repositories]]` tables.

A repository with the same name in a later class replaces the earlier one.
Credentials are references (`env:NAME`, `file:/path` or `/path`), read only
at build time (tree/aptsources.py), never stored here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesmith.config.tomlfile import check_keys
from imagesmith.errors import ConfigError

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


def check_repository(repo: object, where: str) -> dict[str, Any]:
    """A `[[repositories]]` table, checked; suites default later, per image."""
    if not isinstance(repo, dict):
        raise ConfigError(f"{where}: expected a table")
    check_keys(
        repo, REPOSITORY_KEYS, where, hint=f"allowed keys: {', '.join(sorted(REPOSITORY_KEYS))}"
    )
    for key in ("name", "uri"):
        if not isinstance(repo.get(key), str) or not repo[key]:
            raise ConfigError(f"{where}: `{key}` is required and must be a string")
    for key in ("suites", "components"):
        if key in repo and (
            not isinstance(repo[key], list) or not all(isinstance(v, str) for v in repo[key])
        ):
            raise ConfigError(f"{where}: `{key}` must be a list of strings")
    for key in ("signed_by", "ca_cert", "client_cert", "client_key", "auth"):
        if not isinstance(repo.get(key, ""), str):
            raise ConfigError(f"{where}: `{key}` must be a string")
    for key in ("signed_by", "ca_cert"):  # public files, read on the build host
        if repo.get(key) and not Path(repo[key]).is_file():
            what = "signed_by key file" if key == "signed_by" else "ca_cert file"
            raise ConfigError(f"{where}: {what} {repo[key]!r} not found")
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
