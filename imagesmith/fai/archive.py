"""The archive's package names, read at import time, as FAI's
install_packages reads them from `apt-cache dumpavail`.

FAI drops unknown packages from its install lists and uses the names to
tell `memtest86+` (a package) from `vim-` (remove vim). We read
`MIRROR/dists/SUITE/Release`, then `COMPONENT/binary-ARCH/Packages.xz`
(or `.gz`, or plain) for each component, check it against the Release
file's SHA256, and keep only the `Package:` names and the names in
`Provides:` (a virtual package something provides is not unknown).

The names, not the index, are cached under the imagesmith cache dir, one
file per suite, component and architecture, keyed by the Release file's
hash: a new Release reads the index again and drops the old file.

The mirror is `--mirror` or the build host's Debian archive
(`host/aptsources.py`); no archive host is written here.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from imagesmith import log
from imagesmith.errors import BuildError

CACHE_SUBDIR = "fai-package-names"
TIMEOUT = 60


def keep(data: bytes) -> bytes:
    return data


DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".xz": lzma.decompress, ".gz": gzip.decompress, "": keep,
}  # fmt: skip
DEBIAN_COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")
FETCH_HINT = "give a reachable archive with --mirror URI, or --offline to check no names"


def fetch_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            data: bytes = response.read()
            return data
    except (urllib.error.URLError, OSError) as e:
        raise BuildError(f"cannot read {url}: {e}", hint=FETCH_HINT) from e


def release_sha256(release: str) -> dict[str, str]:
    """{path: sha256} from a Release file's SHA256 section."""
    sums: dict[str, str] = {}
    section = ""
    for line in release.splitlines():
        if line and not line[0].isspace():
            section = line.split(":", 1)[0]
            continue
        words = line.split()
        if section == "SHA256" and len(words) == 3:
            sums[words[2]] = words[0]
    return sums


def names_from_index(text: str) -> set[str]:
    """The `Package:` names and the names in `Provides:` of a Packages file."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("Package:"):
            names.add(line[len("Package:") :].strip())
        elif line.startswith("Provides:"):
            for provided in line[len("Provides:") :].split(","):
                name = re.split(r"[\s(]", provided.strip(), maxsplit=1)[0]
                if name:
                    names.add(name)
    return names


def fetch_index(dists: str, sums: dict[str, str], component: str, arch: str) -> str:
    base = f"{component}/binary-{arch}/Packages"
    for suffix, decompress in DECOMPRESSORS.items():
        if base + suffix not in sums:
            continue
        url = f"{dists}/{base}{suffix}"
        log.info(f"reading package names from {url}")
        data = fetch_url(url)
        if hashlib.sha256(data).hexdigest() != sums[base + suffix]:
            raise BuildError(f"{url}: does not match its Release file's SHA256", hint=FETCH_HINT)
        return decompress(data).decode("utf-8", errors="replace")
    raise BuildError(f"{dists}/Release lists no {base}(.xz|.gz)", hint=FETCH_HINT)


def archive_package_names(
    mirror: str, suite: str, components: tuple[str, ...], arch: str, cache_dir: Path | None
) -> set[str]:
    """Every package name, and every name provided, in SUITE's COMPONENTS;
    cached under CACHE_DIR when one is given."""
    dists = f"{mirror.rstrip('/')}/dists/{suite}"
    release = fetch_url(f"{dists}/Release")
    key = hashlib.sha256(release).hexdigest()[:32]
    sums = release_sha256(release.decode("utf-8", errors="replace"))
    names: set[str] = set()
    for component in components:
        prefix = f"{suite}-{component}-{arch}-".replace("/", "_")
        cached = cache_dir / CACHE_SUBDIR / f"{prefix}{key}" if cache_dir else None
        if cached and cached.is_file():
            names.update(cached.read_text().split())
            continue
        found = names_from_index(fetch_index(dists, sums, component, arch))
        if cached:
            write_cached_names(cached, prefix, found)
        names.update(found)
    return names


def write_cached_names(cached: Path, prefix: str, names: set[str]) -> None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    for stale in cached.parent.glob(f"{prefix}*"):
        stale.unlink()  # an older Release's names
    partial = cached.with_name(f".{cached.name}.{os.getpid()}-{threading.get_ident()}")
    partial.write_text("\n".join(sorted(names)) + "\n")
    partial.replace(cached)


def components_from_sources(text: str) -> list[str]:
    """Debian archive components named by `deb` lines and deb822 `Components:`."""
    found: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["deb"]:
            words = [w for w in words[1:] if not w.startswith("[") and not w.endswith("]")]
            words = words[2:]
        elif words[:1] == ["Components:"]:
            words = words[1:]
        else:
            continue
        found += [w for w in words if w in DEBIAN_COMPONENTS and w not in found]
    return found


def space_components(space: Path, classes: tuple[str, ...]) -> list[str]:
    """Components of the sources the space's fcopy would install: for each
    file under files/etc/apt/sources.list*, the highest-priority class's."""
    found: list[str] = []
    apt = space / "files" / "etc" / "apt"
    folders = [apt / "sources.list", *sorted(apt.glob("sources.list.d/*"))]
    for folder in folders:
        chosen = [folder / c for c in classes if (folder / c).is_file()]
        if chosen:
            text = chosen[-1].read_text(errors="replace")
            found += [c for c in components_from_sources(text) if c not in found]
    return found
