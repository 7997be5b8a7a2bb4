"""The remote stage cache: package-stage entries in an OCI registry, shared by CI runners.

A remote is a registry repository such as `registry.example:5000/imagesmith-cache`
(`--cache-remote`, or `$IMAGESMITH_CACHE_REMOTE`). An entry is an OCI
artifact tagged with its stage key:

- the manifest's artifactType is `ARTIFACT_TYPE`;
- its config blob is the entry's `entry.json`, plus `tree_sha256`;
- its one layer is the entry's `root.tar`, uncompressed.

skopeo moves entries between the registry and an OCI layout directory in the
cache directory (`--preserve-digests`: nothing is recompressed, so a digest
means the same bytes everywhere). skopeo checks every blob against its
digest while it pulls; then `pull_entry()` checks the tree's SHA-256 against
the layer digest and the `tree_sha256` the pusher recorded, before the entry
is renamed into the local cache. An entry that fails any check is reported and
never used: the stage is rebuilt and pushed again.

Pushing the same key twice at once is harmless: blobs are addressed by their
content, and the tag ends up naming one complete manifest or the other.

Credentials: skopeo reads `$REGISTRY_AUTH_FILE`, then
`$XDG_RUNTIME_DIR/containers/auth.json`, then `~/.docker/config.json`. With
`$IMAGESMITH_CACHE_REMOTE_USERNAME` and `$IMAGESMITH_CACHE_REMOTE_PASSWORD` set,
they are written to a private temporary auth file for each command: a password
never goes into an argv (which the log shows).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesmith import log
from imagesmith.cache import entries
from imagesmith.cache import stages as stagecache
from imagesmith.errors import BuildError, ConfigError
from imagesmith.host.run import run

ENV_REMOTE = "IMAGESMITH_CACHE_REMOTE"
ENV_MODE = "IMAGESMITH_CACHE_REMOTE_MODE"  # "pull" or "pull-push" (the default)
ENV_INSECURE = "IMAGESMITH_CACHE_REMOTE_INSECURE"  # "1": plain HTTP or unverified TLS
ENV_USERNAME = "IMAGESMITH_CACHE_REMOTE_USERNAME"
ENV_PASSWORD = "IMAGESMITH_CACHE_REMOTE_PASSWORD"
MODES = ("pull", "pull-push")

ARTIFACT_TYPE = "application/vnd.imagesmith.stage.v1"
ENTRY_MEDIA_TYPE = "application/vnd.imagesmith.stage.entry.v1+json"
TREE_MEDIA_TYPE = "application/vnd.imagesmith.stage.tree.v1.tar"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
IMAGE_ANNOTATION = "org.imagesmith.stage.image"
CREATED_ANNOTATION = "org.opencontainers.image.created"
# registry[:port]/path, no scheme, no tag, no digest
_REF = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+$")
_MISSING = re.compile(r"manifest unknown|name unknown", re.IGNORECASE)


@dataclass(frozen=True)
class RemoteCache:
    ref: str  # registry/repository
    push: bool = True  # False: a pull-only runner
    tls_verify: bool = True

    @property
    def registry(self) -> str:
        return self.ref.split("/", 1)[0]

    def tagged(self, key: str) -> str:
        return f"docker://{self.ref}:{key}"


def finalize_remote(
    ref: str | None,
    *,
    pull_only: bool = False,
    insecure: bool = False,
    env: Mapping[str, str] = os.environ,
) -> RemoteCache | None:
    """The remote from the command line, else the environment; None when there is none."""
    ref = ref or env.get(ENV_REMOTE, "")
    if not ref:
        return None
    if not _REF.match(ref):
        raise ConfigError(
            f"remote stage cache {ref!r} is not a registry repository",
            hint="give HOST[:PORT]/REPOSITORY, lower case, without docker://, tag or digest",
        )
    mode = env.get(ENV_MODE, "pull-push")
    if mode not in MODES:
        raise ConfigError(f"{ENV_MODE}={mode!r}", hint=f"one of: {', '.join(MODES)}")
    return RemoteCache(
        ref,
        push=not pull_only and mode == "pull-push",
        tls_verify=not (insecure or env.get(ENV_INSECURE, "") == "1"),
    )


@contextlib.contextmanager
def skopeo_auth(remote: RemoteCache, flag: str = "--authfile") -> Iterator[list[str]]:
    """skopeo's auth arguments: a private auth file when the environment has
    credentials, else none (skopeo finds the usual files itself)."""
    user, password = os.environ.get(ENV_USERNAME, ""), os.environ.get(ENV_PASSWORD, "")
    if not (user and password):
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="imagesmith-auth-") as directory:
        path = Path(directory) / "auth.json"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {remote.registry: {"auth": token}}}, f)
        yield [flag, os.fspath(path)]


def tls_flag(remote: RemoteCache, direction: str = "") -> list[str]:
    name = f"--{direction}-tls-verify" if direction else "--tls-verify"
    return [] if remote.tls_verify else [f"{name}=false"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def layout_dir(cache_dir: Path, key: str) -> Iterator[Path]:
    """A scratch OCI layout beside the entries (same filesystem: blobs move by
    rename or hard link); named so `cache prune` knows a leftover."""
    parent = stagecache.stages_dir(cache_dir)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{entries.TEMP_PREFIX}oci-{key}-{secrets.token_hex(4)}-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def push_entry(remote: RemoteCache, cache_dir: Path, key: str) -> None:
    """Push the local entry of `key` to the remote, tagged `key`."""
    entry = stagecache.entry_dir(cache_dir, key)
    tree = entry / stagecache.TREE_FILE
    info = json.loads((entry / stagecache.ENTRY_FILE).read_text())
    tree_digest = sha256_file(tree)
    info["tree_sha256"] = tree_digest
    with layout_dir(cache_dir, key) as layout:
        (layout / "blobs/sha256").mkdir(parents=True)
        os.link(tree, layout / "blobs/sha256" / tree_digest)
        config = write_blob(layout, json.dumps(info, indent=2).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": ENTRY_MEDIA_TYPE, **config},
            "layers": [
                {
                    "mediaType": TREE_MEDIA_TYPE,
                    "digest": f"sha256:{tree_digest}",
                    "size": tree.stat().st_size,
                }
            ],
            "annotations": {
                IMAGE_ANNOTATION: str(info.get("image", "")),
                CREATED_ANNOTATION: time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(info.get("created", 0)))
                ),
            },
        }
        described = write_blob(layout, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": MANIFEST_MEDIA_TYPE,
                    **described,
                    "annotations": {"org.opencontainers.image.ref.name": key},
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index))
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        with skopeo_auth(remote, "--dest-authfile") as auth:
            run(
                ["skopeo", "copy", "--quiet", "--preserve-digests", *tls_flag(remote, "dest"),
                 *auth, f"oci:{layout}:{key}", remote.tagged(key)],
                what=f"pushing the package stage to {remote.ref}",
            )  # fmt: skip


class RemoteEntryError(BuildError):
    """A remote entry that is there but must not be used (failed a digest check)."""


def pull_entry(remote: RemoteCache, cache_dir: Path, key: str) -> bool:
    """Fetch `key` into the local cache; False when the remote has no such entry.

    Raises RemoteEntryError for an entry that fails a check, BuildError when
    the registry cannot be asked at all.
    """
    with layout_dir(cache_dir, key) as layout:
        target = layout / "pulled"
        with skopeo_auth(remote, "--src-authfile") as auth:
            result = run(
                ["skopeo", "copy", "--quiet", "--preserve-digests", *tls_flag(remote, "src"),
                 *auth, remote.tagged(key), f"oci:{target}:{key}"],
                capture=True, check=False, what=f"pulling the package stage from {remote.ref}",
            )  # fmt: skip
        error = result.stderr.decode(errors="replace").strip()
        if result.returncode != 0:
            if "digest" in error.lower():
                raise RemoteEntryError(f"remote stage entry {key} failed its digest check: {error}")
            if _MISSING.search(error):
                return False
            raise BuildError(f"remote stage cache {remote.ref}: {error}")
        tree_blob, info = check_pulled(target, key)
        with entries.new_entry(stagecache.entry_dir(cache_dir, key)) as temp:
            os.rename(tree_blob, temp / stagecache.TREE_FILE)
            (temp / stagecache.ENTRY_FILE).write_text(json.dumps(info, indent=2) + "\n")
            # Checked against the registry's digests above; the local entry
            # carries its own, as every entry does (cache/entries.py).
            entries.write_digests(temp, [stagecache.TREE_FILE])
    return True


def check_pulled(layout: Path, key: str) -> tuple[Path, dict[str, Any]]:
    """(the tree blob, the entry info) of a pulled entry, every digest checked."""

    def blob(descriptor: Mapping[str, Any]) -> tuple[Path, str]:
        algorithm, _, digest = str(descriptor.get("digest", "")).partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RemoteEntryError(f"remote stage entry {key}: unexpected digest {descriptor}")
        path = layout / "blobs/sha256" / digest
        if sha256_file(path) != digest:
            raise RemoteEntryError(f"remote stage entry {key}: blob {digest} does not match")
        return path, digest

    try:
        index = json.loads((layout / "index.json").read_text())
        manifest_path, _ = blob(index["manifests"][0])
        manifest = json.loads(manifest_path.read_bytes())
        if manifest.get("artifactType") != ARTIFACT_TYPE or len(manifest["layers"]) != 1:
            raise RemoteEntryError(f"remote stage entry {key} is not an imagesmith stage")
        config_path, _ = blob(manifest["config"])
        info = json.loads(config_path.read_bytes())
        tree, tree_digest = blob(manifest["layers"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise RemoteEntryError(f"remote stage entry {key} is malformed: {e!r}") from e
    if info.get("key") != key or info.get("tree_sha256") != tree_digest:
        raise RemoteEntryError(
            f"remote stage entry {key} does not describe its tree "
            f"(key {info.get('key')!r}, tree_sha256 {info.get('tree_sha256')!r})"
        )
    log.debug(f"    remote stage entry {key}: tree sha256:{tree_digest} checked")
    return tree, info


@dataclass(frozen=True)
class RemoteEntry:
    key: str
    size: int
    image: str
    created: str


def list_remote(remote: RemoteCache) -> list[RemoteEntry]:
    """Every entry of the remote, one manifest request per tag."""
    with skopeo_auth(remote) as auth:
        tags = run(
            ["skopeo", "list-tags", *tls_flag(remote), *auth, f"docker://{remote.ref}"],
            capture=True, what=f"listing {remote.ref}",
        )  # fmt: skip
        found = []
        for tag in sorted(json.loads(tags.stdout).get("Tags") or []):
            raw = run(
                ["skopeo", "inspect", "--raw", *tls_flag(remote), *auth, remote.tagged(tag)],
                capture=True, check=False, what=f"reading {remote.ref}:{tag}",
            )  # fmt: skip
            try:
                manifest = json.loads(raw.stdout)
            except ValueError:
                continue
            if raw.returncode != 0 or manifest.get("artifactType") != ARTIFACT_TYPE:
                continue
            notes = manifest.get("annotations", {})
            found.append(
                RemoteEntry(
                    tag,
                    sum(int(layer.get("size", 0)) for layer in manifest.get("layers", [])),
                    notes.get(IMAGE_ANNOTATION, ""),
                    notes.get(CREATED_ANNOTATION, ""),
                )
            )
    return found
