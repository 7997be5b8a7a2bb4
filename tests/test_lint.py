from __future__ import annotations

import tomllib
from pathlib import Path

from tests.conftest import EXAMPLES, imagesmith

EXAMPLE_IMAGES = len(tomllib.loads((EXAMPLES / "imagesmith.toml").read_text())["images"])


def add_script(space: Path, name: str, text: str) -> Path:
    script = space / "classes/example/scripts" / name
    script.write_text(text)
    script.chmod(0o755)
    return script


def test_example_config_space_is_clean() -> None:
    result = imagesmith("lint", "-C", "examples", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{EXAMPLE_IMAGES} of {EXAMPLE_IMAGES} image(s) resolved, 0 problem(s)" in result.stderr


def test_lint_reports_script_problems_one_line_each(config_copy: Path) -> None:
    no_shebang = add_script(config_copy, "20-no-shebang", "echo hi\n")
    no_set_e = add_script(config_copy, "30-no-set-e", "#!/bin/sh\necho hi\n")
    broken = add_script(config_copy, "40-broken", "#!/bin/sh\nset -eu\nif true; then\n")
    add_script(config_copy, "50-python", "#!/usr/bin/env python3\nprint('fine')\n")
    result = imagesmith("lint", "-C", config_copy, timeout=60)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"{no_shebang}:1: no #! line: the script cannot be executed" in lines
    assert any(line.startswith(f"{no_set_e}:1: shell script without `set -e`") for line in lines)
    assert any(line.startswith(f"{broken}: syntax error") for line in lines)
    assert len(lines) == 3


def test_lint_reports_a_unit_link_that_is_not_a_symlink(config_copy: Path) -> None:
    wants = config_copy / "classes/example/files/etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "good.service").symlink_to("/usr/lib/systemd/system/good.service")
    text = wants / "lost.service"
    text.write_text("/usr/lib/systemd/system/lost.service")
    result = imagesmith("lint", "-C", config_copy, timeout=60)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{text}: not a symlink: systemd ignores it (make it one: "
        f"ln -sf /usr/lib/systemd/system/lost.service {text})"
    ]


def test_lint_reports_every_broken_image(config_copy: Path) -> None:
    config = config_copy / "imagesmith.toml"
    config.write_text(config.read_text().replace("classes = [", 'classes = ["missing", '))
    result = imagesmith("lint", "-C", config_copy, timeout=60)
    assert result.returncode == 2  # a config error, as `build` would say
    # every example image now lists the missing class
    assert result.stdout.count("unknown class 'missing'") == EXAMPLE_IMAGES
    assert f"0 of {EXAMPLE_IMAGES} image(s) resolved" in result.stderr
