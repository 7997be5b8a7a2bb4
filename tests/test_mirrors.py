"""Unit tests for reading the build host's apt sources, on a fake /etc/apt."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagesmith.errors import ConfigError
from imagesmith.host.aptsources import host_apt_entries, host_debian_mirror

MIRROR = "http://mirror.example/debian"
SECURITY = "http://security.example/debian-security"
VENDOR = "https://vendor.example/repo"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def apt_dir(tmp_path: Path) -> Path:
    (tmp_path / "apt/sources.list.d").mkdir(parents=True)
    return tmp_path / "apt"


def test_one_line_list_with_options(apt_dir: Path) -> None:
    write(
        apt_dir / "sources.list",
        f"""
        # the main archive
        deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} trixie main
        deb-src {MIRROR} trixie main
        #deb http://commented.example/debian trixie main
        deb [ arch=amd64 signed-by=/k.gpg ] {SECURITY} trixie-security main  # trailing
        deb [arch=amd64 signed-by=/k.gpg] {MIRROR} trixie-updates main

        deb {MIRROR}
        """,
    )
    assert host_apt_entries(apt_dir) == [
        (MIRROR, ["trixie"]),
        (SECURITY, ["trixie-security"]),
        (MIRROR, ["trixie-updates"]),
    ]
    assert host_debian_mirror(apt_dir) == MIRROR


def test_deb822_sources_skips_disabled_stanzas(apt_dir: Path) -> None:
    write(
        apt_dir / "sources.list.d/debian.sources",
        f"""
        # Disabled: must be ignored.
        Types: deb
        URIs: http://disabled.example/debian
        Suites: trixie
        Components: main
        Enabled: no

        Types: deb-src
        URIs: http://sources-only.example/debian
        Suites: trixie

        Types: deb deb-src
        URIs: {MIRROR}
        Suites: trixie trixie-updates
        Components: main contrib
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

        Types: deb
        URIs: {SECURITY}
        Suites: trixie-security
        Components: main
        Enabled: yes
        Signed-By:
         -----BEGIN PGP PUBLIC KEY BLOCK-----
         .
         mQINBGQ
         -----END PGP PUBLIC KEY BLOCK-----
        """,
    )
    assert host_apt_entries(apt_dir) == [
        (MIRROR, ["trixie", "trixie-updates"]),
        (SECURITY, ["trixie-security"]),
    ]
    assert host_debian_mirror(apt_dir) == MIRROR


def test_deb822_field_names_are_case_insensitive(apt_dir: Path) -> None:
    write(
        apt_dir / "sources.list.d/debian.sources",
        f"""
        types: deb
        uris: {MIRROR}
        suites: sid
        enabled: No
        """,
    )
    assert host_apt_entries(apt_dir) == []


def test_sources_list_comes_first_then_sources_list_d_in_name_order(apt_dir: Path) -> None:
    write(apt_dir / "sources.list.d/b.list", "deb http://b.example/debian bookworm main\n")
    write(
        apt_dir / "sources.list.d/a.sources",
        "Types: deb\nURIs: http://a.example/debian\nSuites: sid\n",
    )
    write(apt_dir / "sources.list.d/c.list.save", f"deb {MIRROR} trixie main\n")
    write(apt_dir / "sources.list.d/d.distUpgrade", f"deb {MIRROR} trixie main\n")
    write(apt_dir / "sources.list", "deb http://first.example/debian trixie main\n")
    assert host_apt_entries(apt_dir) == [
        ("http://first.example/debian", ["trixie"]),
        ("http://a.example/debian", ["sid"]),
        ("http://b.example/debian", ["bookworm"]),
    ]
    assert host_debian_mirror(apt_dir) == "http://first.example/debian"


def test_non_debian_repository_is_not_taken_as_the_mirror(apt_dir: Path) -> None:
    write(
        apt_dir / "sources.list.d/a-vendor.list",
        f"deb [signed-by=/etc/apt/keyrings/vendor.gpg] {VENDOR} nodistro main\n",
    )
    write(
        apt_dir / "sources.list.d/b-debian.sources",
        f"Types: deb\nURIs: {MIRROR}\nSuites: trixie\nComponents: main\n",
    )
    assert host_apt_entries(apt_dir)[0] == (VENDOR, ["nodistro"])
    assert host_debian_mirror(apt_dir) == MIRROR


def test_security_and_updates_suites_alone_are_not_the_mirror(apt_dir: Path) -> None:
    write(
        apt_dir / "sources.list",
        f"deb {SECURITY} trixie-security main\ndeb {MIRROR} unstable main\n",
    )
    assert host_debian_mirror(apt_dir) == MIRROR


def test_no_debian_entry_is_a_config_error(apt_dir: Path) -> None:
    write(apt_dir / "sources.list", f"deb {VENDOR} nodistro main\n")
    with pytest.raises(ConfigError) as e:
        host_debian_mirror(apt_dir)
    assert e.value.exit_code == 2
    assert str(apt_dir) in e.value.message
    assert "mirror" in e.value.hint


def test_empty_apt_dir_has_no_entries(tmp_path: Path) -> None:
    assert host_apt_entries(tmp_path / "no-such-dir") == []
    with pytest.raises(ConfigError):
        host_debian_mirror(tmp_path / "no-such-dir")
