"""imagesmith reads apt credentials (auth.conf) exactly as apt does.

apt itself is the reference: each case runs the host's `apt-get update`
against loopback servers that record the Authorization header, and the
credentials imagesmith would send for the same URL must be the same.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from repo_server import make_certificates

from imagesmith.cache.index import IndexSource, fetch_index
from imagesmith.errors import BuildError
from imagesmith.host.aptsources import apt_auth_for

Seen = list[tuple[str, str | None]]


@contextlib.contextmanager
def recording_server(certs: Path | None, host: str = "127.0.0.1") -> Iterator[tuple[int, Seen]]:
    seen: Seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(404)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    if certs is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs / "server.crt", certs / "server.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    certs = tmp_path_factory.mktemp("certs")
    make_certificates(certs)
    with recording_server(certs) as (https, https_seen), recording_server(None) as (http, seen):
        yield {"certs": certs, "https": (https, https_seen), "http": (http, seen)}


def apt_sends(
    servers: dict[str, object], scheme: str, auth: str, tmp: Path
) -> tuple[str, str] | None:
    """What apt-get sends for the first index file of https|http://127.0.0.1:PORT/b."""
    port, seen = servers[scheme]  # type: ignore[misc]
    (tmp / "lists/partial").mkdir(parents=True)
    (tmp / "sources.list").write_text(f"deb {scheme}://127.0.0.1:{port}/b trixie main\n")
    (tmp / "auth.conf").write_text(auth)
    seen.clear()
    options = {
        "Dir::Etc::sourcelist": tmp / "sources.list", "Dir::Etc::sourceparts": "/nonexistent",
        "Dir::State::lists": tmp / "lists", "Dir::Cache": tmp, "Dir::Etc::netrc": tmp / "auth.conf",
        "Dir::Etc::netrcparts": "/nonexistent", "Acquire::https::CaInfo": servers["certs"] / "ca.crt",  # type: ignore[operator]
        "APT::Sandbox::User": "root",
    }  # fmt: skip
    argv = ["apt-get", "-q", *(f"-o{k}={v}" for k, v in options.items()), "update"]
    subprocess.run(argv, capture_output=True, check=False)
    assert seen, "apt-get sent no request"
    header = seen[0][1]
    if header is None:
        return None
    login, _, password = base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
    return login, password


CASES = [
    ("https", "machine 127.0.0.1 login u password p"),
    ("https", "machine 127.0.0.1:PORT login u password p"),
    ("https", "machine 127.0.0.1:1 login u password p"),
    ("https", "machine 127.0.0.1:PORT/b login u password p"),
    ("https", "machine 127.0.0.1/b login u password p"),
    ("https", "machine 127.0.0.1:PORT/b/ login u password p"),
    ("https", "machine 127.0.0.1:PORT/bb login u password p"),
    ("https", "machine 127.0.0.1:PORT/c login u password p"),
    ("https", "machine https://127.0.0.1 login u password p"),
    ("https", "machine http://127.0.0.1 login u password p"),
    ("https", "# a comment\nmachine 127.0.0.2 login u password p"),
    ("https", "#machine 127.0.0.1 login c password c\nmachine 127.0.0.1 login u password p"),
    ("https", "machine 127.0.0.1\n  login u\n  password p\n"),
    ("https", "machine other login a password b\nmachine 127.0.0.1 login u password p"),
    ("https", "machine 127.0.0.1 login first password one\nmachine 127.0.0.1 login u password p"),
    ("http", "machine 127.0.0.1 login u password p"),
    ("http", "machine http://127.0.0.1 login u password p"),
    ("http", "machine http://127.0.0.1:PORT/b login u password p"),
]


@pytest.mark.parametrize(("scheme", "auth"), CASES)
def test_credentials_match_what_apt_sends(
    servers: dict[str, object], tmp_path: Path, scheme: str, auth: str
) -> None:
    port = servers[scheme][0]  # type: ignore[index]
    auth = auth.replace("PORT", str(port))
    url = f"{scheme}://127.0.0.1:{port}/b/dists/trixie/InRelease"
    assert apt_auth_for(auth, url) == apt_sends(servers, scheme, auth, tmp_path)


def test_credentials_do_not_follow_a_redirect_to_another_host(tmp_path: Path) -> None:
    """urllib copies an Authorization header to wherever a server redirects;
    apt, and so imagesmith, look the credentials up again for the new URL."""
    with recording_server(None, "127.0.0.2") as (port_b, seen_b):
        seen_a: Seen = []

        class Redirect(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen_a.append((self.path, self.headers.get("Authorization")))
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.2:{port_b}{self.path}")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            auth = tmp_path / "auth.conf"
            auth.write_text("machine http://127.0.0.1 login u password p\n")
            uri = f"http://127.0.0.1:{server.server_address[1]}/b"
            with pytest.raises(BuildError):  # B answers 404
                fetch_index(IndexSource("vendor", uri, "trixie", auth=str(auth)))
        finally:
            server.shutdown()
            server.server_close()
    assert seen_a and seen_a[0][1] == "Basic " + base64.b64encode(b"u:p").decode()
    assert seen_b and all(header is None for _, header in seen_b)
