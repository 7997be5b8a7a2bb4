"""The build host's hygiene key: what makes the manifest's secret digests
useless to anyone else.

A manifest records, for each secret a build used (a client key, an apt
password), an HMAC-SHA256 keyed with a random key that never leaves the
build host (`hygiene.key` in the cache directory, mode 0600). `imagesmith
verify` on the same host can still find a secret that a file of the image
holds whole; a published manifest gives nobody a digest to brute-force.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_FILE = "hygiene.key"
KEY_BYTES = 32


def hygiene_key(cache_dir: Path, *, create: bool = True) -> bytes:
    """The key, made on first use; b"" when it does not exist and not `create`."""
    path = cache_dir / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if not create:
            return b""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another build made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key
