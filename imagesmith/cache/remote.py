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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesmith import log
from imagesmith.cache import entries, initramfs
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
TREE_MEDIA_TYPE = "application/vnd.imagesmith.stage.tree.v1.tar"
INITRAMFS_ARTIFACT_TYPE = "application/vnd.imagesmith.initramfs.v1"
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

    def tagged(self, tag: str) -> str:
        return f"docker://{self.ref}:{tag}"


@dataclass(frozen=True)
class Kind:
    """One kind of shared entry: its tag, its artifact type and its files."""

    name: str  # for messages
    tag_prefix: str
    artifact_type: str
    entry_dir: Callable[[Path, str], Path]  # (cache directory, key) -> the local entry
    files: tuple[tuple[str, str], ...]  # (file of the entry, its layer's media type)
    info_file: str = ""  # the entry's JSON description, carried in the config blob

    @property
    def config_media_type(self) -> str:
        return f"{self.artifact_type.removesuffix('.v1')}.entry.v1+json"

    def tag(self, key: str) -> str:
        return f"{self.tag_prefix}{key}"


STAGE = Kind(
    "package stage", "", ARTIFACT_TYPE, stagecache.entry_dir,
    ((stagecache.TREE_FILE, TREE_MEDIA_TYPE),), stagecache.ENTRY_FILE,
)  # fmt: skip
INITRAMFS = Kind(
    "initramfs", "initramfs-", INITRAMFS_ARTIFACT_TYPE, initramfs.entry_dir,
    ((initramfs.IMAGE_FILE, "application/vnd.imagesmith.initramfs.image.v1"),
     (initramfs.TRACKED_FILE, "application/vnd.imagesmith.initramfs.tracked.v1+json")),
)  # fmt: skip
KINDS = {kind.artifact_type: kind for kind in (STAGE, INITRAMFS)}


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


sha256_file = entries.file_sha256


@contextlib.contextmanager
def layout_dir(parent: Path, key: str) -> Iterator[Path]:
    """A scratch OCI layout beside the entries in `parent` (same filesystem:
    blobs move by hard link); named so `cache prune` knows a leftover."""
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


def push_entry(remote: RemoteCache, cache_dir: Path, key: str, kind: Kind = STAGE) -> None:
    """Push the local entry of `key` to the remote, tagged `kind.tag(key)`."""
    entry = kind.entry_dir(cache_dir, key)
    info = json.loads((entry / kind.info_file).read_text()) if kind.info_file else {}
    try:  # the SHA-256s the save recorded: a 4 GB tree is not read again to push it
        recorded = entries.recorded_digests(entry)
        files = {name: recorded[name][1] for name, _ in kind.files}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise BuildError(f"{entry}: no usable {entries.DIGEST_FILE} ({e!r})") from e
    info.update(key=key, files=files)
    if kind is STAGE:
        info["tree_sha256"] = files[stagecache.TREE_FILE]
    tag = kind.tag(key)
    with layout_dir(entry.parent, key) as layout:
        (layout / "blobs/sha256").mkdir(parents=True)
        layers = []
        for name, media_type in kind.files:
            if not (layout / "blobs/sha256" / files[name]).exists():  # two files alike
                os.link(entry / name, layout / "blobs/sha256" / files[name])
            size = (entry / name).stat().st_size
            layers.append(
                {"mediaType": media_type, "digest": f"sha256:{files[name]}", "size": size}
            )
        config = write_blob(layout, json.dumps(info, indent=2).encode())
        created = float(info.get("created", time.time()))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": kind.artifact_type,
            "config": {"mediaType": kind.config_media_type, **config},
            "layers": layers,
            "annotations": {
                IMAGE_ANNOTATION: str(info.get("image", "")),
                CREATED_ANNOTATION: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            },
        }
        described = write_blob(layout, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": MANIFEST_MEDIA_TYPE,
                    **described,
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index))
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        with skopeo_auth(remote, "--dest-authfile") as auth:
            run(
                ["skopeo", "copy", "--quiet", "--preserve-digests", *tls_flag(remote, "dest"),
                 *auth, f"oci:{layout}:{tag}", remote.tagged(tag)],
                what=f"pushing the {kind.name} to {remote.ref}",
            )  # fmt: skip


class RemoteEntryError(BuildError):
    """A remote entry that is there but must not be used (failed a digest check)."""


def pull_entry(remote: RemoteCache, cache_dir: Path, key: str, kind: Kind = STAGE) -> bool:
    """Fetch `key` into the local cache; False when the remote has no such entry.

    Raises RemoteEntryError for an entry that fails a check, BuildError when
    the registry cannot be asked at all.
    """
    final = kind.entry_dir(cache_dir, key)
    tag = kind.tag(key)
    with layout_dir(final.parent, key) as layout:
        target = layout / "pulled"
        with skopeo_auth(remote, "--src-authfile") as auth:
            result = run(
                ["skopeo", "copy", "--quiet", "--preserve-digests", *tls_flag(remote, "src"),
                 *auth, remote.tagged(tag), f"oci:{target}:{tag}"],
                capture=True, check=False, what=f"pulling the {kind.name} from {remote.ref}",
            )  # fmt: skip
        error = result.stderr.decode(errors="replace").strip()
        if result.returncode != 0:
            if "digest" in error.lower():
                raise RemoteEntryError(
                    f"remote {kind.name} entry {key} failed its digest check: {error}"
                )
            if _MISSING.search(error):
                return False
            raise BuildError(f"remote cache {remote.ref}: {error}")
        blobs, info = check_pulled(target, key, kind)
        with entries.new_entry(final, replace=True) as temp:
            for (name, _), blob in zip(kind.files, blobs, strict=True):
                os.link(blob, temp / name)
            if kind.info_file:
                (temp / kind.info_file).write_text(json.dumps(info, indent=2) + "\n")
            # Checked against the registry's digests above; the local entry
            # carries its own, as every entry does (cache/entries.py).
            entries.write_digests(temp, [name for name, _ in kind.files])
    return True


def check_pulled(layout: Path, key: str, kind: Kind) -> tuple[list[Path], dict[str, Any]]:
    """(the layer blobs in `kind.files` order, the entry info) of a pulled
    entry, every digest checked."""
    what = f"remote {kind.name} entry {key}"

    def blob(descriptor: Mapping[str, Any]) -> tuple[Path, str]:
        algorithm, _, digest = str(descriptor.get("digest", "")).partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RemoteEntryError(f"{what}: unexpected digest {descriptor}")
        path = layout / "blobs/sha256" / digest
        if sha256_file(path) != digest:
            raise RemoteEntryError(f"{what}: blob {digest} does not match")
        return path, digest

    try:
        index = json.loads((layout / "index.json").read_text())
        manifest_path, _ = blob(index["manifests"][0])
        manifest = json.loads(manifest_path.read_bytes())
        layers = manifest["layers"]
        if manifest.get("artifactType") != kind.artifact_type or len(layers) != len(kind.files):
            raise RemoteEntryError(f"{what} is not an imagesmith {kind.name} entry")
        config_path, _ = blob(manifest["config"])
        info = json.loads(config_path.read_bytes())
        pulled = [blob(layer) for layer in layers]
        files = info.get("files", {})
        described = [files.get(name) for name, _ in kind.files]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise RemoteEntryError(f"{what} is malformed: {e!r}") from e
    if info.get("key") != key or described != [digest for _, digest in pulled]:
        raise RemoteEntryError(
            f"{what} does not describe its files (key {info.get('key')!r}, files {files!r})"
        )
    log.debug(f"    {what}: {', '.join(f'sha256:{d}' for _, d in pulled)} checked")
    return [path for path, _ in pulled], info


@dataclass(frozen=True)
class RemoteEntry:
    key: str
    kind: str
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
            kind = KINDS.get(manifest.get("artifactType", "")) if raw.returncode == 0 else None
            if kind is None:
                continue
            notes = manifest.get("annotations", {})
            found.append(
                RemoteEntry(
                    tag.removeprefix(kind.tag_prefix),
                    kind.name,
                    sum(int(layer.get("size", 0)) for layer in manifest.get("layers", [])),
                    notes.get(IMAGE_ANNOTATION, ""),
                    notes.get(CREATED_ANNOTATION, ""),
                )
            )
    return found
