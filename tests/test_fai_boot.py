"""FAI's own example config space (Debian's fai-doc), imported unchanged,
adapted to trixie only on the command line, built and booted under OVMF;
the guest check finds the demo user, the packages and the fcopy'd files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, imagesmith

pytestmark = [pytest.mark.build]
FAI_EXAMPLE = Path("/usr/share/doc/fai-doc/examples/simple")


@pytest.mark.boot
@pytest.mark.skipif(not FAI_EXAMPLE.is_dir(), reason="needs the fai-doc package")
def test_fai_doc_example_builds_and_boots(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the build tests run as root"
    space, out = tmp_path / "space", tmp_path / "out"
    result = imagesmith(
        "fai", "import", FAI_EXAMPLE, "-N", "-c", "FAIBASE,DEBIAN,DHCPC,DEMO,GRUB_EFI",
        "--suite", "trixie", "--size", "3GiB", "-o", space,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scripts/GRUB_EFI/10-setup: GRUB setup: skipped" in result.stdout
    assert (space / "FAI-IMPORT.txt").read_text() in result.stdout
    result = imagesmith("build", "-C", space, "-o", out, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    result = imagesmith("test", out / "fai.raw", "--checks", REPO / "tests/checks/fai")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert re.search(r"ok\s+10-fai-demo", result.stdout), result.stdout
