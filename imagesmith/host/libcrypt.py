"""Password hashes checked with the host's libcrypt, through ctypes.

Python 3.13 removed the `crypt` module, and Debian 13 ships 3.13, so the
hygiene scan calls libcrypt itself (libxcrypt's `libcrypt.so.1`, the library
the old module wrapped): `crypt_r`, which is thread-safe, with its state in a
zeroed buffer of our own. It understands every hash Debian writes to
/etc/shadow (yescrypt, SHA-512, SHA-256, MD5).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hmac

from imagesmith.errors import ImagesmithError

# libxcrypt's struct crypt_data is 32 KiB, glibc's old one 128 KiB: room for both.
CRYPT_DATA_SIZE = 256 * 1024


@functools.cache
def load_libcrypt() -> ctypes.CDLL:
    for name in ("libcrypt.so.1", ctypes.util.find_library("crypt")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
        lib.crypt_r.restype = ctypes.c_char_p
        return lib
    raise ImagesmithError(
        "libcrypt (libcrypt.so.1) not found on this host: password hashes cannot be checked",
        hint="install the libcrypt1 package",
    )


def crypt_hash(phrase: str, setting: str) -> str:
    """libcrypt's hash of `phrase` with the method and salt of `setting`
    (a hash from /etc/shadow); "" when libcrypt does not understand it."""
    data = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
    result: bytes | None = load_libcrypt().crypt_r(phrase.encode(), setting.encode(), data)
    # On failure libxcrypt returns NULL or a string starting with "*".
    if not result or result.startswith(b"*"):
        return ""
    return result.decode(errors="replace")


def password_matches(phrase: str, stored: str) -> bool:
    """Whether `stored` (an /etc/shadow hash) is the hash of `phrase`."""
    hashed = crypt_hash(phrase, stored)
    return bool(hashed) and hmac.compare_digest(hashed, stored)
