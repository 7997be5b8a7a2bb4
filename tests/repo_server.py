"""A real signed apt repository served over HTTPS on loopback, requiring a
client certificate. Used by the private-repository tests."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path


def sh(*argv: str | os.PathLike[str], **kwargs: object) -> str:
    return subprocess.run(
        [os.fspath(a) for a in argv],
        check=True,
        capture_output=True,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    ).stdout


def make_certificates(d: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", "/CN=imagesmith test CA", "-keyout", d / "ca.key", "-out", d / "ca.crt")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
           "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        sh("openssl", "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.crt",
           "-CAkey", d / "ca.key", "-CAcreateserial", "-days", "2",
           "-extfile", d / f"{name}.ext", "-out", d / f"{name}.crt")  # fmt: skip


def build_deb(workdir: Path, name: str, depends: str, out: Path) -> Path:
    root = workdir / f"pkg-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: test <t@example.invalid>\n"
        f"Depends: {depends}\nDescription: imagesmith test package {name}\n"
    )
    share = root / "usr/share" / name
    share.mkdir(parents=True)
    (share / "hello").write_text(f"hello from {name}\n")
    target = out / f"{name}_1.0_all.deb"
    sh("dpkg-deb", "--root-owner-group", "--build", root, target)
    return target


def make_repository(repo: Path, debs: list[Path], gnupg: Path, suite: str) -> Path:
    """dists/SUITE/main/binary-amd64/Packages + a signed InRelease; returns the public key."""
    pool = repo / "pool"
    pool.mkdir(parents=True)
    stanzas = []
    for deb in debs:
        target = pool / deb.name
        target.write_bytes(deb.read_bytes())
        data = target.read_bytes()
        control = sh("dpkg-deb", "--field", target).rstrip("\n")
        stanzas.append(
            f"{control}\nFilename: pool/{deb.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    packages_dir = repo / "dists" / suite / "main" / "binary-amd64"
    packages_dir.mkdir(parents=True)
    packages = "\n".join(stanzas).encode()
    (packages_dir / "Packages").write_bytes(packages)
    release = (
        f"Suite: {suite}\nCodename: {suite}\nComponents: main\nArchitectures: amd64\n"
        f"Date: {formatdate(usegmt=True)}\nSHA256:\n"
        f" {hashlib.sha256(packages).hexdigest()} {len(packages)} main/binary-amd64/Packages\n"
    )
    dists = repo / "dists" / suite
    (dists / "Release").write_text(release)
    gnupg.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(gnupg)}
    sh("gpg", "--batch", "--passphrase", "", "--quick-gen-key", "imagesmith test <t@example.invalid>",
       "rsa2048", "sign", "1d", env=env)  # fmt: skip
    sh(
        "gpg",
        "--batch",
        "--yes",
        "--clearsign",
        "-o",
        dists / "InRelease",
        dists / "Release",
        env=env,
    )
    key = repo.parent / "repo-key.gpg"
    key.write_bytes(
        subprocess.run(["gpg", "--export"], env=env, check=True, capture_output=True).stdout
    )
    # gpg started an agent for this throwaway home; leave no daemon behind.
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True)
    return key


@dataclass
class Repo:
    uri: str
    key: Path
    ca_cert: Path
    client_cert: Path
    client_key: Path
    requests: list[str]


@contextlib.contextmanager
def serve_https(directory: Path, certs: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve `directory` on 127.0.0.1 over HTTPS, refusing clients without a valid certificate."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            requests.append(self.path)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    context.load_verify_locations(certs / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()
