"""The desktop example: KDE Plasma with SDDM, proven on screen.

Booted under TCG with a display, the guest checks that the display manager
and its greeter run, and the host photographs the screen: the photo must
have the many colours of a greeter, not the few of a console or a blank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imagesmith.inspect.screen import MIN_COLOURS, distinct_colours
from tests.conftest import REPO, imagesmith

pytestmark = [pytest.mark.build]
# Packages a complete Plasma has and a bare one (no Recommends) lacks.
COMPLETE_PLASMA = (
    "konsole",
    "systemsettings",
    "plasma-nm",
    "pipewire",
    "breeze",
    "sddm-theme-breeze",
)


def installed(built_examples: Path) -> set[str]:
    manifest = json.loads((built_examples / "desktop.manifest.json").read_text())
    return {p["name"] for p in manifest["packages"]}


def test_desktop_is_a_complete_plasma(built_examples: Path) -> None:
    packages = installed(built_examples)
    assert not [p for p in COMPLETE_PLASMA if p not in packages], sorted(packages)
    assert len(packages) > 1000
    manifest = json.loads((built_examples / "desktop.manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["network"] == "networkmanager" and settings["filesystem"] == "btrfs"
    assert settings["serial_console"] and settings["grow_root"] and settings["new_fs_uuid"]
    # No known password: root is locked and verify says so.
    assert settings["root_password_hash"] == ""
    result = imagesmith("verify", built_examples / "desktop.raw", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.boot
def test_desktop_boots_to_the_greeter(built_examples: Path, tmp_path: Path) -> None:
    shot, report = tmp_path / "greeter.png", tmp_path / "report.json"
    result = imagesmith(
        "test", built_examples / "desktop.raw", "--screenshot", shot, "--report", report,
        "--timeout", "900", timeout=1200,
    )  # fmt: skip
    # Keep the photo where a person can look at it after the run.
    if shot.exists():
        shutil.copyfile(shot, REPO / ".pytest-desktop-greeter.png")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    for name in ("graphical-target-reached", "display-manager-active", "greeter-running"):
        assert checks[name]["passed"], checks[name]
    assert any("sddm" in line for line in checks["greeter-running"]["output"])
    assert distinct_colours(shot) >= MIN_COLOURS
