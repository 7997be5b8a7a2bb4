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
"""

from __future__ import annotations

import os
from pathlib import Path

from imagesmith.errors import ConfigError
from imagesmith.host.run import require_tools, run

KEY_SET_FILES = ("db.key", "db.crt", "db.der")
KEY_DAYS = 3650


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


def sign_pe(path: Path, *, keys: Path) -> None:
    """Sign the PE file at `path` in place with keys/db.key and keys/db.crt."""
    require_tools("sbsign")
    signed = path.with_name(path.name + ".signed-tmp")
    run(
        [
            "sbsign", "--key", os.fspath(keys / "db.key"), "--cert", os.fspath(keys / "db.crt"),
            "--output", os.fspath(signed), os.fspath(path),
        ],
        capture=True, what=f"sbsign {path.name}",
    )  # fmt: skip
    os.replace(signed, path)
