"""The index state of the archive and every class repository, for the stage key.

The InRelease (or Release) file of each repository suite is fetched once per
build, with the credentials the build uses, and hashed: the archive
publishing new versions changes the stage cache key.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPMessage
from pathlib import Path
from typing import IO

from imagesmith.config.space import ResolvedImage
from imagesmith.errors import BuildError
from imagesmith.host.aptsources import apt_auth_for

INDEX_TIMEOUT = 15.0


@dataclass(frozen=True)
class IndexSource:
    """One repository suite whose index state goes into the key, and how to reach it."""

    name: str  # "mirror" or the repository's name, for errors
    uri: str
    suite: str
    client_cert: str = ""  # build-time files (tree/aptsources.py wrote them)
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
        """A GET of `url` with the credentials apt would send for it."""
        request = urllib.request.Request(url)
        if self.auth and Path(self.auth).is_file():
            credentials = apt_auth_for(Path(self.auth).read_text(), url)
            if credentials is not None:
                token = b64encode(":".join(credentials).encode()).decode()
                # Unredirected: urllib must not copy it to wherever a server redirects.
                request.add_unredirected_header("Authorization", f"Basic {token}")
        return request

    def redirected(self, request: urllib.request.Request, url: str) -> urllib.request.Request:
        """The request to follow a redirect with: credentials only where apt
        would send them for the new URL."""
        return self.request(url)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.client_cert or self.ca_cert):
            return None
        context = ssl.create_default_context(cafile=self.ca_cert or None)
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key or None)
        return context


class AptRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, source: IndexSource) -> None:
        self.source = source

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        followed = super().redirect_request(req, fp, code, msg, headers, newurl)
        return None if followed is None else self.source.redirected(req, newurl)


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
            opener = urllib.request.build_opener(
                urllib.request.HTTPSHandler(context=source.ssl_context()),
                AptRedirects(source),
            )
            with opener.open(source.request(url), timeout=timeout) as r:
                return hashlib.sha256(r.read()).hexdigest()
        except (urllib.error.URLError, OSError, ValueError, ssl.SSLError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")  # SSLError: reason None
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
