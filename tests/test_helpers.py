"""Tests for the shell helpers class scripts get on PATH: fcopy and ainsl.

They run on the host against a temporary image root (IMAGESMITH_ROOT), with
two temporary class fcopy/ trees on IMAGESMITH_FCOPY_PATH.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent.parent / "imagesmith" / "data" / "helpers"


@dataclass
class Image:
    root: Path
    first: Path  # fcopy/ tree of the first class
    last: Path  # fcopy/ tree of the last class

    def run(self, helper: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "IMAGESMITH_ROOT": os.fspath(self.root),
            "IMAGESMITH_FCOPY_PATH": f"{self.first}:{self.last}",
            "IMAGESMITH_CLASSES": "first last",
        }
        return subprocess.run(
            [os.fspath(HELPERS / helper), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )


@pytest.fixture
def image(tmp_path: Path) -> Image:
    image = Image(tmp_path / "root", tmp_path / "classes/01-first", tmp_path / "classes/02-last")
    for d in (image.root, image.first, image.last):
        d.mkdir(parents=True)
    return image


def put(tree: Path, path: str, text: str, *, mode: int = 0o644) -> Path:
    file = tree / path.lstrip("/")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    file.chmod(mode)
    return file


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("helper", ["fcopy", "ainsl"])
def test_helpers_are_executable(helper: str) -> None:
    assert os.access(HELPERS / helper, os.X_OK)


# --- fcopy ---------------------------------------------------------------------


def test_fcopy_picks_the_last_class_that_has_the_file(image: Image) -> None:
    put(image.first, "/etc/app.conf", "first\n")
    put(image.last, "/etc/app.conf", "last\n")
    result = image.run("fcopy", "/etc/app.conf")
    assert result.returncode == 0, result.stderr
    assert (image.root / "etc/app.conf").read_text() == "last\n"
    assert result.stdout == f"fcopy: /etc/app.conf from {image.last}\n"


def test_fcopy_uses_an_earlier_class_when_the_last_lacks_the_file(image: Image) -> None:
    put(image.first, "/etc/only-first", "first\n")
    result = image.run("fcopy", "/etc/only-first")
    assert result.returncode == 0, result.stderr
    assert (image.root / "etc/only-first").read_text() == "first\n"


def test_fcopy_creates_parent_directories_and_replaces_the_target(image: Image) -> None:
    put(image.last, "/usr/local/lib/app/deep.conf", "new\n")
    put(image.root, "/usr/local/lib/app/deep.conf", "old\n", mode=0o600)
    result = image.run("fcopy", "/usr/local/lib/app/deep.conf")
    assert result.returncode == 0, result.stderr
    target = image.root / "usr/local/lib/app/deep.conf"
    assert target.read_text() == "new\n"
    assert mode_of(target) == 0o644  # the source's mode, not the old file's


def test_fcopy_copies_several_paths(image: Image) -> None:
    put(image.first, "/etc/a", "a\n")
    put(image.last, "/etc/b", "b\n")
    result = image.run("fcopy", "/etc/a", "/etc/b")
    assert result.returncode == 0, result.stderr
    assert (image.root / "etc/a").read_text() == "a\n"
    assert (image.root / "etc/b").read_text() == "b\n"


def test_fcopy_keeps_the_source_mode_by_default(image: Image) -> None:
    put(image.last, "/usr/local/bin/tool", "#!/bin/sh\n", mode=0o750)
    assert image.run("fcopy", "/usr/local/bin/tool").returncode == 0
    assert mode_of(image.root / "usr/local/bin/tool") == 0o750


def test_fcopy_m_sets_the_mode(image: Image) -> None:
    put(image.last, "/etc/secret", "s\n", mode=0o644)
    result = image.run("fcopy", "-m", "0600", "/etc/secret")
    assert result.returncode == 0, result.stderr
    assert mode_of(image.root / "etc/secret") == 0o600


def test_fcopy_o_sets_the_owner(image: Image) -> None:
    put(image.last, "/etc/owned", "o\n")
    result = image.run("fcopy", "-o", "1234:5678", "/etc/owned")
    assert result.returncode == 0, result.stderr
    st = (image.root / "etc/owned").stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_fcopy_default_owner_is_root(image: Image) -> None:
    source = put(image.last, "/etc/owned", "o\n")
    os.chown(source, 1234, 5678)
    assert image.run("fcopy", "/etc/owned").returncode == 0
    st = (image.root / "etc/owned").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_fcopy_missing_file_fails_with_a_message(image: Image) -> None:
    put(image.first, "/etc/present", "p\n")
    result = image.run("fcopy", "/etc/missing", "/etc/present")
    assert result.returncode == 1
    assert "fcopy: /etc/missing: no class has fcopy/etc/missing" in result.stderr
    assert "first last" in result.stderr
    assert not (image.root / "etc/present").exists()


def test_fcopy_i_ignores_missing_files(image: Image) -> None:
    put(image.first, "/etc/present", "p\n")
    result = image.run("fcopy", "-i", "/etc/missing", "/etc/present")
    assert result.returncode == 0, result.stderr
    assert not (image.root / "etc/missing").exists()
    assert (image.root / "etc/present").read_text() == "p\n"


@pytest.mark.parametrize("args", [[], ["etc/relative"], ["-x", "/etc/a"]])
def test_fcopy_usage_errors_exit_2(image: Image, args: list[str]) -> None:
    put(image.last, "/etc/relative", "r\n")
    result = image.run("fcopy", *args)
    assert result.returncode == 2
    assert result.stderr
    assert not (image.root / "etc").exists()


# --- ainsl ---------------------------------------------------------------------


def test_ainsl_appends_once(image: Image) -> None:
    put(image.root, "/etc/modules", "loop\n")
    first = image.run("ainsl", "/etc/modules", "vfio")
    second = image.run("ainsl", "/etc/modules", "vfio")
    assert (first.returncode, second.returncode) == (0, 0)
    assert (image.root / "etc/modules").read_text() == "loop\nvfio\n"
    assert first.stdout == "ainsl: /etc/modules: appended 'vfio'\n"
    assert second.stdout == ""


def test_ainsl_creates_missing_files_and_directories(image: Image) -> None:
    result = image.run("ainsl", "/etc/new.d/file.conf", "key = value")
    assert result.returncode == 0, result.stderr
    assert (image.root / "etc/new.d/file.conf").read_text() == "key = value\n"


def test_ainsl_handles_a_file_without_trailing_newline(image: Image) -> None:
    put(image.root, "/etc/hosts.allow", "ALL: 127.0.0.1")
    assert image.run("ainsl", "/etc/hosts.allow", "sshd: ALL").returncode == 0
    assert (image.root / "etc/hosts.allow").read_text() == "ALL: 127.0.0.1\nsshd: ALL\n"


def test_ainsl_finds_an_existing_last_line_without_newline(image: Image) -> None:
    put(image.root, "/etc/hosts.allow", "a\nsshd: ALL")
    assert image.run("ainsl", "/etc/hosts.allow", "sshd: ALL").returncode == 0
    assert (image.root / "etc/hosts.allow").read_text() == "a\nsshd: ALL"


def test_ainsl_matches_whole_lines_literally(image: Image) -> None:
    put(image.root, "/etc/conf", "a.c = 1\nxab\n")
    assert image.run("ainsl", "/etc/conf", "abc = 1").returncode == 0
    assert image.run("ainsl", "/etc/conf", "ab").returncode == 0
    assert image.run("ainsl", "/etc/conf", "--opt").returncode == 0
    assert (image.root / "etc/conf").read_text() == "a.c = 1\nxab\nabc = 1\nab\n--opt\n"


def test_ainsl_empty_file_gets_no_blank_line(image: Image) -> None:
    put(image.root, "/etc/empty", "")
    assert image.run("ainsl", "/etc/empty", "x").returncode == 0
    assert (image.root / "etc/empty").read_text() == "x\n"


def test_ainsl_s_is_silent(image: Image) -> None:
    result = image.run("ainsl", "-s", "/etc/quiet", "x")
    assert (result.returncode, result.stdout) == (0, "")
    assert (image.root / "etc/quiet").read_text() == "x\n"
