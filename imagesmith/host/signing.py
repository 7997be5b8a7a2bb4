"""Secure Boot keys and signing, on the build host.

`make_key_set()` is `imagesmith keys DIR`: a db key and its self-signed
certificate, made by openssl.

| file | what | where it belongs |
| --- | --- | --- |
| `db.key` | the private key (PEM, mode 0600) | on the build host only, outside the config space; never in an image |
| `db.crt` | the certificate (PEM) | builds read it; `imagesmith test --mok` enrols it |
| `db.der` | the same certificate (DER) | `mokutil --import db.der` on a machine, or firmware setup's db enrolment |

`sign_pe()` signs an EFI binary or a kernel with `sbsign` (sbsigntool). The
key is read by sbsign from its file on the host: it is never copied into
the image tree, and the build passes its contents to the hygiene scan,
which fails the build should they turn up in the image.

**A key in a token (an HSM, a smart card, SoftHSM).** Instead of `db.key`,
the key folder holds `db.pkcs11`: one line, the PKCS#11 URI of the private
key (RFC 7512), for example `pkcs11:token=fleet;object=db;type=private`.
sbsign then signs through OpenSSL's pkcs11 engine (libengine-pkcs11-openssl,
which finds the token's module through p11-kit), and the private key never
leaves the token. The token's PIN comes from `$IMAGESMITH_PKCS11_PIN`: it is
written to a private file for sbsign (`pin-source=file:`), never into an
argv or a log, hidden from every other command the build runs, and handed
to the hygiene scan like a key file's contents.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagesmith.errors import ConfigError
from imagesmith.host.run import require_tools, run

KEY_SET_FILES = ("db.key", "db.crt", "db.der")
KEY_DAYS = 3650
PKCS11_FILE = "db.pkcs11"
PIN_ENV = "IMAGESMITH_PKCS11_PIN"


@dataclass(frozen=True)
class SigningKey:
    """How sbsign reaches the private key: a file, or a PKCS#11 URI."""

    cert: Path
    key_file: Path | None = None
    pkcs11_uri: str = ""

    def secrets(self) -> list[bytes]:
        """What must never turn up in an image: the key, or the token's PIN."""
        if self.key_file is not None:
            return [self.key_file.read_bytes()]
        pin = os.environ.get(PIN_ENV, "")
        return [pin.encode()] if pin else []


def signing_key(keys: Path) -> SigningKey:
    """The key set in `keys`: db.crt with db.pkcs11 (a token) or db.key (a file)."""
    if (keys / PKCS11_FILE).is_file():
        uri = (keys / PKCS11_FILE).read_text().strip()
        if not uri.startswith("pkcs11:") or any(c.isspace() for c in uri):
            raise ConfigError(
                f"{keys / PKCS11_FILE}: not one PKCS#11 URI",
                hint="one line such as pkcs11:token=fleet;object=db;type=private",
            )
        if "pin-value=" in uri:
            raise ConfigError(
                f"{keys / PKCS11_FILE}: holds the token's PIN (pin-value)",
                hint=f"drop pin-value from the URI and set ${PIN_ENV} for the build",
            )
        return SigningKey(keys / "db.crt", pkcs11_uri=uri)
    return SigningKey(keys / "db.crt", key_file=keys / "db.key")


def make_key_set(target: Path, *, common_name: str) -> list[Path]:
    """db.key, db.crt and db.der in `target`; an existing key is never overwritten."""
    require_tools("openssl")
    existing = [target / n for n in KEY_SET_FILES if (target / n).exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]} exists: imagesmith keys never overwrites a key set",
            hint="pick another folder, or move the old key set away first (see key rotation "
            "in docs/secure-boot.md)",
        )
    target.mkdir(parents=True, exist_ok=True)
    key, cert, der = (target / n for n in KEY_SET_FILES)
    old_umask = os.umask(0o077)
    try:
        run(
            [
                "openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes",
                "-days", str(KEY_DAYS), "-subj", f"/CN={common_name}/",
                "-keyout", os.fspath(key), "-out", os.fspath(cert),
            ],
            capture=True, what="openssl req (the db key and certificate)",
        )  # fmt: skip
    finally:
        os.umask(old_umask)
    run(
        ["openssl", "x509", "-in", os.fspath(cert), "-outform", "DER", "-out", os.fspath(der)],
        capture=True, what="openssl x509 (the certificate as DER)",
    )  # fmt: skip
    cert.chmod(0o644)
    der.chmod(0o644)
    return [key, cert, der]


def sign_pe(path: Path, *, key: SigningKey) -> None:
    """Sign the PE file at `path` in place with `key`."""
    require_tools("sbsign")
    signed = path.with_name(path.name + ".signed-tmp")
    with key_arguments(key) as arguments:
        run(
            ["sbsign", *arguments, "--cert", os.fspath(key.cert),
             "--output", os.fspath(signed), os.fspath(path)],
            capture=True, what=f"sbsign {path.name}",
        )  # fmt: skip
    os.replace(signed, path)


@contextlib.contextmanager
def key_arguments(key: SigningKey) -> Iterator[list[str]]:
    """sbsign's --key (and --engine), with the PIN in a private file for the call."""
    if key.key_file is not None:
        yield ["--key", os.fspath(key.key_file)]
        return
    pin = os.environ.get(PIN_ENV, "")
    if not pin:
        yield ["--engine", "pkcs11", "--key", key.pkcs11_uri]
        return
    with tempfile.TemporaryDirectory(prefix="imagesmith-pin-") as directory:
        pin_file = Path(directory) / "pin"
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pin)
        yield ["--engine", "pkcs11", "--key", f"{key.pkcs11_uri};pin-source=file:{pin_file}"]
