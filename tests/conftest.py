"""Shared fixtures. Built images are shared by the whole session.

The build tests need root, mmdebstrap and the archive, exactly as
`make test` sets them up; the .deb cache (/var/cache/imagesmith) is shared
with every other build on the machine, so a warm machine downloads nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def imagesmith(
    *args: str | os.PathLike[str], timeout: int = 900, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "imagesmith", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def built_examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every example image (`imagesmith build --all -j 2`), built once.

    The command's log is kept as build.log and its result table as build.table.
    """
    assert os.geteuid() == 0, "the build tests run as root (make test under sudo)"
    out = tmp_path_factory.mktemp("examples-out")
    result = imagesmith("build", "-C", EXAMPLES, "-o", out, "--all", "-j", "2", timeout=1800)
    (out / "build.log").write_text(result.stderr)
    (out / "build.table").write_text(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return out


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    """A writable copy of the example config space."""
    target = tmp_path / "space"
    shutil.copytree(EXAMPLES, target, symlinks=True)
    return target


def empty_stage_cache(base: Path) -> Path:
    """A cache directory with no stage or initramfs entries, sharing the machine's .debs.

    A build with it runs mmdebstrap (nothing to reuse) but downloads nothing
    the machine already has.
    """
    from imagesmith.build import default_cache_dir

    shared_debs = default_cache_dir() / "debs"
    shared_debs.mkdir(parents=True, exist_ok=True)
    cache = base / "cache"
    cache.mkdir()
    (cache / "debs").symlink_to(shared_debs)
    return cache
