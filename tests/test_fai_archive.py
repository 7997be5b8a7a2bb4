"""FAI import against the archive's package names: a small fake archive,
served from a local folder (file://) or a loopback HTTP server, no network."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import lzma
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagesmith.errors import BuildError
from imagesmith.fai.archive import (
    CACHE_SUBDIR,
    archive_package_names,
    components_from_sources,
    space_components,
)
from imagesmith.fai.convert import ImportRequest, import_fai_space, split_names
from imagesmith.fai.packages import read_package_config

MAIN = """\
Package: less
Version: 1

Package: memtest86+
Version: 7

Package: vim
Version: 9

Package: postfix
Provides: mail-transport-agent, default-mta (= 3.9)
Version: 3.9

Package: linux-image-amd64
Version: 6
"""
CONTRIB = "Package: steam-installer\nVersion: 1\n"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the class sandbox needs root")


def make_archive(root: Path, suite: str = "trixie", main: str = MAIN) -> Path:
    dists = root / "dists" / suite
    indexes = {
        "main/binary-amd64/Packages.xz": lzma.compress(main.encode()),
        "contrib/binary-amd64/Packages.gz": gzip.compress(CONTRIB.encode()),
    }
    lines = [f"Suite: {suite}", "SHA256:"]
    for name, data in indexes.items():
        (dists / name).parent.mkdir(parents=True, exist_ok=True)
        (dists / name).write_bytes(data)
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    (dists / "Release").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def http_archive(tmp_path: Path) -> Iterator[str]:
    root = make_archive(tmp_path / "archive")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.fspath(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_names_and_provides_cached_by_release(tmp_path: Path) -> None:
    root = make_archive(tmp_path / "archive")
    cache = tmp_path / "cache"
    names = archive_package_names(root.as_uri(), "trixie", ("main", "contrib"), "amd64", cache)
    assert {"less", "memtest86+", "mail-transport-agent", "default-mta"} <= names
    assert "steam-installer" in names and "3.9)" not in names
    (root / "dists/trixie/main/binary-amd64/Packages.xz").unlink()
    again = archive_package_names(root.as_uri(), "trixie", ("main",), "amd64", cache)
    assert "less" in again, "the cached names, keyed by the same Release"
    make_archive(root, main="Package: newpkg\n")
    newer = archive_package_names(root.as_uri(), "trixie", ("main",), "amd64", cache)
    assert "newpkg" in newer and "less" not in newer
    assert len(list((cache / CACHE_SUBDIR).glob("trixie-main-amd64-*"))) == 1


def test_index_not_matching_release_is_an_error(tmp_path: Path) -> None:
    root = make_archive(tmp_path / "archive")
    (root / "dists/trixie/main/binary-amd64/Packages.xz").write_bytes(lzma.compress(b"x"))
    with pytest.raises(BuildError, match="does not match its Release"):
        archive_package_names(root.as_uri(), "trixie", ("main",), "amd64", None)
    with pytest.raises(BuildError, match="cannot read"):
        archive_package_names(root.as_uri(), "sid", ("main",), "amd64", None)


def test_package_words_resolved_against_the_names(tmp_path: Path) -> None:
    path = tmp_path / "X"
    path.write_text(
        "PACKAGES install release=trixie-backports\n"
        "less nosuchpkg memtest86+ vim- linux-image-686-pae- mail-transport-agent\n"
        "less+ vim=9 vim:amd64 ${kernel}\n"
        "PACKAGES remove\nnotinarchive vim+\n"
        "PACKAGES taskinst\nssh-server gnome-desktop\n"
    )
    known = {"less", "memtest86+", "vim", "mail-transport-agent", "linux-image-amd64"}
    known.add("task-ssh-server")
    out = read_package_config(
        path, "package_config/X", set(), {"kernel": "linux-image-amd64"}, known
    )
    assert out.install == [
        "less/trixie-backports", "memtest86+/trixie-backports",
        "mail-transport-agent/trixie-backports", "less/trixie-backports", "vim=9",
        "vim:amd64/trixie-backports", "linux-image-amd64/trixie-backports", "vim", "task-ssh-server",
    ]  # fmt: skip
    assert out.remove == ["vim", "notinarchive"]
    assert [n.line() for n in out.notes] == [
        "package_config/X:2: unknown package nosuchpkg: dropped, as FAI drops it",
        "package_config/X:2: unknown package linux-image-686-pae-: dropped, as FAI drops it",
        "package_config/X:7: unknown task gnome-desktop: dropped: no task-gnome-desktop in the "
        "archive",
    ]


def test_components_from_the_space_sources(tmp_path: Path) -> None:
    text = "deb [arch=amd64] http://m/debian trixie main contrib # x\ndeb-src u s non-free\n"
    assert components_from_sources(text) == ["main", "contrib"]
    assert components_from_sources("Components: main non-free-firmware\n") == [
        "main", "non-free-firmware",
    ]  # fmt: skip
    space = tmp_path / "fai"
    (space / "files/etc/apt/sources.list").mkdir(parents=True)
    (space / "files/etc/apt/sources.list/DEBIAN").write_text("deb u s main contrib\n")
    (space / "files/etc/apt/sources.list/LAST").write_text("deb u s main non-free\n")
    assert space_components(space, ("DEBIAN", "OTHER")) == ["main", "contrib"]
    assert space_components(space, ("DEBIAN", "LAST")) == ["main", "non-free"]


def test_split_names() -> None:
    assert split_names("FAIBASE,demo_s, DEBIAN  x") == ("FAIBASE", "demo_s", "DEBIAN", "x")


@needs_root
def test_import_drops_unknown_packages_over_http(tmp_path: Path, http_archive: str) -> None:
    space = tmp_path / "fai"
    (space / "class").mkdir(parents=True)
    (space / "package_config").mkdir()
    (space / "package_config/DEMO").write_text(
        "PACKAGES install-norec\nless nosuchpkg memtest86+ vim-\n"
        "PACKAGES aptitude\nsteam-installer\n"
    )
    request = ImportRequest(
        space=space, classes=["DEMO"], renew=False, hostname="h", size="", suite="trixie",
        output=tmp_path / "new", mirror=http_archive, components=("contrib",),
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    report = import_fai_space(request)
    line = "package_config/DEMO:2: unknown package nosuchpkg: dropped, as FAI drops it"
    assert line in report.splitlines()
    assert "looked up in main only" not in report
    assert (tmp_path / "new/FAI-IMPORT.txt").read_text() == report
    toml = (tmp_path / "new/classes/DEMO/class.toml").read_text()
    assert 'install = ["less", "memtest86+", "steam-installer"]' in toml
    assert 'remove = ["vim"]' in toml
    image = (tmp_path / "new/imagesmith.toml").read_text()
    assert f'mirror = "{http_archive}"' in image
    assert 'components = ["main", "contrib"]' in image


@needs_root
def test_new_without_a_script_printing_the_classes_says_so(tmp_path: Path) -> None:
    """FAI -N defines only what class/ scripts print; -c alone sets
    $cmdlineclasses, which a space without class/01-classes never echoes."""
    space = tmp_path / "fai"
    (space / "class").mkdir(parents=True)
    (space / "class/10-base").write_text("#!/bin/sh\necho BASE\n")
    (space / "class/10-base").chmod(0o755)
    archive = make_archive(tmp_path / "archive")
    request = ImportRequest(
        space=space, classes=["BASE", "DEMO"], renew=True, hostname="h", size="",
        suite="trixie", output=tmp_path / "new", mirror=archive.as_uri(),
    )  # fmt: skip
    report = import_fai_space(request).splitlines()
    assert any(
        line.startswith("class/: -c class DEMO printed by no class/ script") for line in report
    )
    assert not any("-c class BASE" in line for line in report)
