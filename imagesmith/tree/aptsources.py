"""Build-time apt sources: class repositories with their credentials, and
local .deb files as a temporary repository.

What the build needs to reach its sources never ships in the image:

- Credentials (TLS client certificate and key, `auth.conf`-style basic-auth
  lines) are read from files outside the config space or from environment
  variables (`env:NAME`), at build time only. They live in a build-only
  directory (mode 0700) that exists at the same path on the host and inside
  the tree while mmdebstrap runs, so apt finds them in both places; a
  customize hook deletes them from the tree and the build deletes them from
  the host.
- Local .debs from each class's `debs/` folder become a flat repository in
  the same directory, marked trusted, resolved in the same apt run as
  everything else.
- After the build, /etc/apt/sources.list is rewritten: the mirror, plus each
  repository with `keep = true` (the default), without any credential.
  Signing keys of kept repositories go to /etc/apt/keyrings.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets as random_tokens
import shlex
import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from imagesmith.config.classes import class_layers
from imagesmith.config.repositories import Repository
from imagesmith.config.space import ResolvedImage
from imagesmith.errors import ConfigError
from imagesmith.host.paths import copy_into_root, listdir_in_root, remove_in_root, write_in_root
from imagesmith.host.run import hide_from_children, run

BUILD_DIR_PARENT = Path("/var/tmp")
# The build-only sources of a build whose process is gone (host/leftovers.py).
BUILD_DIR_RE = re.compile(r"^imagesmith-build-pid(\d+)-[0-9a-f]+$")
KEYRINGS = "etc/apt/keyrings"
# A password shorter than this is looked for only within its whole auth line:
# alone, it would match by chance in ordinary files.
MIN_SECRET_TOKEN = 8


def read_secret(ref: str, *, where: str, config_space: Path) -> bytes:
    """Contents of a secret given as `env:NAME`, `file:/path` or `/path`."""
    if ref.startswith("env:"):
        name = ref.removeprefix("env:")
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        hide_from_children(name)
        return value.encode()
    path = Path(ref.removeprefix("file:"))
    if not path.is_absolute():
        raise ConfigError(f"{where}: {ref!r}: give an absolute path or env:NAME")
    if path.resolve().is_relative_to(config_space.resolve()):
        raise ConfigError(
            f"{where}: {path} is inside the config space",
            hint="secrets must live outside the config space (a file elsewhere or env:NAME)",
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path}: {e.strerror}") from e


@dataclass
class BuildSources:
    """What mmdebstrap needs for sources beyond the mirror line."""

    directory: Path  # build-only, same path on the host and in the tree
    lines: list[str] = field(default_factory=list)
    aptopts: list[str] = field(default_factory=list)
    local_packages: list[str] = field(default_factory=list)
    secrets: list[bytes] = field(default_factory=list)
    build_only_uris: list[str] = field(default_factory=list)

    def setup_hook(self) -> str:
        q = shlex.quote(str(self.directory))
        return f'mkdir -p "$1"{q} && cp -a {q}/. "$1"{q}/'

    def cleanup_hook(self) -> str:
        return f'rm -rf "$1"{shlex.quote(str(self.directory))}'


def host_key(uri: str) -> str:
    """apt's per-host configuration key for a URI: the host name."""
    return urlsplit(uri).hostname or ""


def add_repository(sources: BuildSources, repo: Repository, config_space: Path) -> None:
    options = []
    if repo.signed_by:
        options.append(f"signed-by={repo.signed_by}")
    secrets_dir = sources.directory / "secrets"
    host = host_key(repo.uri)
    written: dict[str, Path] = {}
    for setting, key, ref in (
        ("client_cert", "SslCert", repo.client_cert),
        ("client_key", "SslKey", repo.client_key),
    ):
        if not ref:
            continue
        data = read_secret(ref, where=f"{repo.source} {setting}", config_space=config_space)
        path = written[setting] = secrets_dir / f"{repo.name}.{key.lower()}"
        path.write_bytes(data)
        path.chmod(0o600)
        sources.secrets.append(data)
        sources.aptopts.append(f'Acquire::https::{host}::{key} "{path}";')
    check_client_certificate(repo, written)
    if repo.ca_cert:
        sources.aptopts.append(f'Acquire::https::{host}::CaInfo "{repo.ca_cert}";')
    if repo.auth:
        data = read_secret(repo.auth, where=f"{repo.source} auth", config_space=config_space)
        auth_dir = secrets_dir / "auth.conf.d"
        auth_dir.mkdir(exist_ok=True)
        (auth_dir / f"{repo.name}.conf").write_bytes(data)
        # Whole credential lines, and each password on its own: a script that
        # copies just the password into the image is caught too.
        tokens = data.decode(errors="replace").split()
        sources.secrets += [
            line.strip().encode() for line in data.decode().splitlines() if "password" in line
        ]
        sources.secrets += [
            value.encode()
            for key, value in zip(tokens, tokens[1:], strict=False)
            if key == "password" and len(value) >= MIN_SECRET_TOKEN
        ]
        sources.aptopts.append(f'Dir::Etc::netrcparts "{auth_dir}";')
    prefix = f"[{' '.join(options)}] " if options else ""
    for suite in repo.suites:
        sources.lines.append(f"deb {prefix}{repo.uri} {suite} {' '.join(repo.components)}")
    if not repo.keep:
        sources.build_only_uris.append(repo.uri)


def check_client_certificate(repo: Repository, written: dict[str, Path]) -> None:
    """Load the client certificate and key as apt will, so a bad one is a
    config error naming the settings, not apt's `InRelease: None`."""
    if "client_cert" not in written:
        if "client_key" in written:
            raise ConfigError(
                f"{repo.source} client_key: set without client_cert",
                hint="client_key is the private key of the certificate client_cert names",
            )
        return
    for setting, marker, what in (
        ("client_cert", b"-----BEGIN CERTIFICATE-----", "PEM certificate"),
        ("client_key", b"PRIVATE KEY-----", "PEM private key"),
    ):
        ref = repo.client_cert if setting == "client_cert" else repo.client_key
        if setting in written and marker not in written[setting].read_bytes():
            raise ConfigError(
                f"{repo.source} {setting}: {ref!r} holds no {what} "
                f"(no {marker.decode().strip('-')} line)",
                hint=f"{setting} must name a {what} file, or env:NAME holding one",
            )
    try:
        context = ssl.create_default_context()
        context.load_cert_chain(written["client_cert"], written.get("client_key"))
    except (ssl.SSLError, OSError) as e:
        refs = f"client_cert {repo.client_cert!r}"
        if repo.client_key:
            refs += f" with client_key {repo.client_key!r}"
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            f"{repo.source} client_cert: the client certificate could not be loaded "
            f"from {refs}: {reason}",
            hint="client_cert must be a PEM certificate and client_key its PEM private key "
            "(or leave client_key out when the certificate file holds the key too)",
        ) from e


def make_local_repository(image: ResolvedImage, sources: BuildSources) -> None:
    """A flat repository of the classes' .debs, with a Packages index."""
    debs = [deb for layer in class_layers(image.classes) for deb in layer.debs]
    if not debs:
        return
    repo = sources.directory / "local"
    repo.mkdir()
    stanzas = []
    for deb in debs:
        target = repo / deb.name
        shutil.copyfile(deb, target)
        control = run(
            ["dpkg-deb", "--field", os.fspath(target)], capture=True, what=f"reading {deb}"
        ).stdout
        data = target.read_bytes()
        fields = control.decode().rstrip("\n")
        stanzas.append(
            f"{fields}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
        name = next(
            line.split(":", 1)[1].strip()
            for line in fields.splitlines()
            if line.startswith("Package:")
        )
        sources.local_packages.append(name)
    (repo / "Packages").write_text("\n".join(stanzas))
    uri = f"file://{repo}"
    sources.lines.append(f"deb [trusted=yes] {uri} ./")
    sources.build_only_uris.append(uri)


def prepare_build_sources(image: ResolvedImage) -> BuildSources:
    directory = BUILD_DIR_PARENT / f"imagesmith-build-pid{os.getpid()}-{random_tokens.token_hex(6)}"
    directory.mkdir(mode=0o700)
    try:
        (directory / "secrets").mkdir(mode=0o700)
        sources = BuildSources(directory)
        for repo in image.repositories:
            add_repository(sources, repo, image.config_space)
        make_local_repository(image, sources)
    except BaseException:
        # A secret that can't be read must not leave the others on the host.
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return sources


def write_image_sources(tree: Path, image: ResolvedImage, mirror: str) -> None:
    """The image's own sources: the mirror and the kept repositories, no credentials."""
    s = image.settings
    lines = [f"deb {mirror} {s.suite} {' '.join(s.components)}"]
    for repo in image.repositories:
        if not repo.keep:
            continue
        options = ""
        if repo.signed_by:
            key = f"{KEYRINGS}/{repo.name}{Path(repo.signed_by).suffix or '.gpg'}"
            copy_into_root(Path(repo.signed_by), tree, key)
            options = f"[signed-by=/{key}] "
        for suite in repo.suites:
            lines.append(f"deb {options}{repo.uri} {suite} {' '.join(repo.components)}")
    write_in_root(tree, "etc/apt/sources.list", "\n".join(lines) + "\n")
    for name in listdir_in_root(tree, "etc/apt/sources.list.d"):
        if name.startswith("imagesmith-") or "mmdebstrap" in name:
            remove_in_root(tree, f"etc/apt/sources.list.d/{name}")
