"""The stage cache: finished package-stage trees, reused across builds.

The bootstrap-and-packages stage (one mmdebstrap run) is the slow part of a
build, and its result depends on few inputs. Those inputs are hashed into a
key (`stage_key()`):

- suite, architecture, components and the mirror;
- every class repository (URI, suites, components), with the content of each
  `signed_by` key file, and the content of every local .deb;
- the index state: the InRelease (or Release) file of each repository and
  suite, fetched once per build, so the archive publishing new versions
  changes the key;
- the merged package set (order does not matter to apt, so it is sorted) and
  the debconf selections;
- the tool version: imagesmith's bootstrap code and the mmdebstrap script.

Everything later (files, scripts, users, removals, boot and disk settings)
is applied to a copy of the cached tree, so changing it reuses the entry.

An entry is `stages/KEY/` in the cache directory holding `root.tar` (the
tree, with owners, modes, xattrs, ACLs, hard links and device nodes) and
`entry.json` (what went into the key, for `imagesmith cache` and for
debugging a miss). It is written under a temporary name and renamed into
place, so an interrupted build never leaves a half entry visible. A lock per
key makes parallel builds with the same key wait for one mmdebstrap run and
share its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesmith.config import ResolvedImage
from imagesmith.errors import BuildError
from imagesmith.run import run

STAGES_DIR = "stages"
TEMP_PREFIX = ".tmp-"
ENTRY_FILE = "entry.json"
TREE_FILE = "root.tar"
INDEX_TIMEOUT = 15.0
# The tree's .debs live in the .deb cache already, and apt rebuilds its own
# binary caches: neither belongs in an entry.
TAR_EXCLUDES = ("./var/cache/apt/archives/*.deb", "./var/cache/apt/*.bin")
TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


@dataclass(frozen=True)
class IndexSource:
    """One repository suite whose index state goes into the key, and how to reach it."""

    name: str  # "mirror" or the repository's name, for errors
    uri: str
    suite: str
    client_cert: str = ""  # build-time files (repositories.py wrote them)
    client_key: str = ""
    ca_cert: str = ""
    auth: str = ""  # an auth.conf file: "machine HOST login USER password PASS"

    @property
    def urls(self) -> tuple[str, str]:
        base = self.uri.rstrip("/")
        if self.suite.endswith("/"):  # a flat repository ("deb URI ./" or "deb URI sub/")
            sub = "/".join(p for p in self.suite.split("/") if p not in ("", "."))
            where = f"{base}/{sub}" if sub else base
        else:
            where = f"{base}/dists/{self.suite}"
        return f"{where}/InRelease", f"{where}/Release"

    def request(self, url: str) -> urllib.request.Request:
        request = urllib.request.Request(url)
        if self.auth and Path(self.auth).is_file():
            host = urllib.parse.urlsplit(url).hostname or ""
            for line in Path(self.auth).read_text().splitlines():
                words = line.split()
                fields = dict(zip(words[::2], words[1::2], strict=False))
                if fields.get("machine", "").split("/")[0] in (host, ""):
                    token = f"{fields.get('login', '')}:{fields.get('password', '')}"
                    request.add_header(
                        "Authorization", f"Basic {b64encode(token.encode()).decode()}"
                    )
                    break
        return request

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.client_cert or self.ca_cert):
            return None
        context = ssl.create_default_context(cafile=self.ca_cert or None)
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key or None)
        return context


def index_sources(
    image: ResolvedImage, mirror: str, build_dir: Path | None = None
) -> list[IndexSource]:
    """The mirror and every class repository, with the credentials the build uses."""
    sources = [IndexSource("mirror", mirror, image.settings.suite)]
    secrets = (build_dir or Path("/nonexistent")) / "secrets"
    for repo in image.repositories:
        extra = {
            "client_cert": os.fspath(secrets / f"{repo.name}.sslcert") if repo.client_cert else "",
            "client_key": os.fspath(secrets / f"{repo.name}.sslkey") if repo.client_key else "",
            "ca_cert": repo.ca_cert,
            "auth": os.fspath(secrets / "auth.conf.d" / f"{repo.name}.conf") if repo.auth else "",
        }
        sources += [IndexSource(repo.name, repo.uri, suite, **extra) for suite in repo.suites]
    return sources


def fetch_index(source: IndexSource, *, timeout: float = INDEX_TIMEOUT) -> str:
    """sha256 of the repository suite's InRelease, or of Release when there is none."""
    errors = []
    for url in source.urls:
        try:
            context = source.ssl_context()
            with urllib.request.urlopen(source.request(url), timeout=timeout, context=context) as r:
                return hashlib.sha256(r.read()).hexdigest()
        except (urllib.error.URLError, OSError, ValueError, ssl.SSLError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
    raise BuildError(
        f"repository {source.name!r} ({source.uri}) failed: cannot fetch the index of "
        f"{source.suite}:\n  " + "\n  ".join(errors),
        hint="check its URI, suite, signing key and credentials (client_cert, client_key, "
        "auth) and the network",
    )


def fetch_index_state(sources: list[IndexSource]) -> dict[str, str]:
    """{InRelease URL: sha256} for every source, fetched in parallel."""
    with ThreadPoolExecutor(max_workers=min(8, len(sources))) as pool:
        hashes = list(pool.map(fetch_index, sources))
    return {s.urls[0]: h for s, h in zip(sources, hashes, strict=True)}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_key_inputs(
    image: ResolvedImage, *, mirror: str, index_state: Mapping[str, str], tool_version: str
) -> dict[str, Any]:
    """Everything that can change the package stage's tree, as plain data."""
    s = image.settings
    return {
        "stage": "bootstrap and packages",
        "tool": tool_version,
        "suite": s.suite,
        "architecture": s.architecture,
        "components": list(s.components),
        "mirror": mirror,
        "repositories": [
            [r.name, r.uri, list(r.suites), list(r.components), r.signed_by]
            for r in image.repositories
        ],
        "keys": {
            r.signed_by: file_sha256(Path(r.signed_by)) for r in image.repositories if r.signed_by
        },
        "local_debs": sorted(
            file_sha256(deb) for c in image.classes for layer in c.layers() for deb in layer.debs
        ),
        "index": dict(sorted(index_state.items())),
        "packages": sorted(image.packages),
        "debconf": image.debconf,
    }


def stage_key(inputs: Mapping[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def stages_dir(cache_dir: Path) -> Path:
    return cache_dir / STAGES_DIR


def entry_dir(cache_dir: Path, key: str) -> Path:
    return stages_dir(cache_dir) / key


@contextlib.contextmanager
def locked(cache_dir: Path, key: str) -> Iterator[None]:
    """Hold the key's lock: one build per key runs mmdebstrap, the rest wait and reuse."""
    stages = stages_dir(cache_dir)
    stages.mkdir(parents=True, exist_ok=True)
    with (stages / f"{TEMP_PREFIX}{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def restore_tree(cache_dir: Path, key: str, tree: Path) -> bool:
    """Extract the entry's tree into `tree` (which must not exist); False on a miss."""
    entry = entry_dir(cache_dir, key)
    if not (entry / TREE_FILE).is_file():
        return False
    tree.mkdir(mode=0o755)
    run(["tar", "-x", *TAR_OPTIONS, "-f", os.fspath(entry / TREE_FILE), "-C", os.fspath(tree)],
        what="restoring the cached package stage")  # fmt: skip
    os.utime(entry)  # last used, for pruning
    return True


def save_tree(cache_dir: Path, key: str, tree: Path, info: Mapping[str, Any]) -> Path:
    """Store `tree` as the entry for `key`, atomically; returns the entry."""
    final = entry_dir(cache_dir, key)
    temp = final.with_name(f"{TEMP_PREFIX}{key}-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        run(
            ["tar", "-c", *TAR_OPTIONS, *(f"--exclude={x}" for x in TAR_EXCLUDES),
             "-f", os.fspath(temp / TREE_FILE), "-C", os.fspath(tree), "."],
            what="saving the package stage to the cache",
        )  # fmt: skip
        record = {"key": key, "created": time.time(), **info}
        (temp / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(temp, final)
        except OSError:  # another build stored the same key first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final
