"""A real OCI registry on loopback for the remote stage cache tests.

Debian's docker-registry (the CNCF Distribution registry) serves plain HTTP
on 127.0.0.1 with its storage in a temporary directory, optionally behind
htpasswd auth.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagesmith.host.libcrypt import crypt_hash


@dataclass(frozen=True)
class Registry:
    address: str  # 127.0.0.1:PORT
    storage: Path

    def ref(self, repository: str = "imagesmith-cache") -> str:
        return f"{self.address}/{repository}"

    def blob(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (sha256:HEX)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / f"docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (the registry accepts nothing else), through
    libxcrypt: Python 3.13 has no crypt module."""
    # 22 salt characters; the last holds 2 bits, so it is one of ".Oeu".
    salt = "".join(secrets.choice(BCRYPT_ALPHABET) for _ in range(21)) + secrets.choice(".Oeu")
    hashed = crypt_hash(password, f"$2b$10${salt}")
    assert hashed.startswith("$2b$10$"), "libcrypt made no bcrypt hash"
    return f"{user}:{hashed}"


@contextlib.contextmanager
def running_registry(base: Path, *, user: str = "", password: str = "") -> Iterator[Registry]:
    storage = base / "storage"
    storage.mkdir(parents=True)
    address = f"127.0.0.1:{free_port()}"
    auth = ""
    if user:
        (base / "htpasswd").write_text(htpasswd_line(user, password) + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: imagesmith-test\n    path: {base / 'htpasswd'}\n"
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}\n" + auth
    )
    with (base / "registry.log").open("wb") as logfile:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=logfile, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v2/", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 with auth: it answers
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((base / "registry.log").read_text()) from None
                time.sleep(0.1)
        yield Registry(address, storage)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
