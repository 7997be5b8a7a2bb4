"""All variants in one command: `imagesmith build --all`, -j, reuse, the table.

The example config space is built once for the session (`--all -j 2`, see
conftest.py); one more run with a deliberately broken image shows that the
others still build and the command fails.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from imagesmith.formats import output_path
from tests.conftest import EXAMPLES, imagesmith

EXAMPLE_IMAGES = tomllib.loads((EXAMPLES / "imagesmith.toml").read_text())["images"]


def table_rows(table: str) -> dict[str, list[str]]:
    """image -> [status, time, outputs] from the table `build` ends with."""
    lines = table.strip().splitlines()
    assert lines[0].split()[:4] == ["image", "status", "time", "outputs"], table
    return {line.split()[0]: line.split(None, 3)[1:] for line in lines[1:]}


def test_examples_show_every_target() -> None:
    targets = {name: image["outputs"] for name, image in EXAMPLE_IMAGES.items()}
    assert any("oci" in o for o in targets.values())
    classes = {name: image["classes"] for name, image in EXAMPLE_IMAGES.items()}
    assert any("bios" in c and "uefi" not in c for c in classes.values())
    assert any("bios" in c and "uefi" in c for c in classes.values())


@pytest.mark.build
def test_build_all_builds_every_example_image(built_examples: Path) -> None:
    rows = table_rows((built_examples / "build.table").read_text())
    assert sorted(rows) == sorted(EXAMPLE_IMAGES)
    for name, image in EXAMPLE_IMAGES.items():
        status, duration, outputs = rows[name]
        assert status == "ok", rows[name]
        assert re.fullmatch(r"\d+\.\ds", duration)
        for fmt in [*image["outputs"], "manifest"]:
            path = output_path(built_examples, name, fmt)
            assert path.stat().st_size > 0, path
            assert path.name in outputs
        manifest = json.loads(output_path(built_examples, name, "manifest").read_text())
        assert sorted(manifest["outputs"]) == sorted(image["outputs"])
    # Nothing temporary is left in the output directory.
    assert not [p for p in built_examples.iterdir() if p.name.startswith(".imagesmith-tmp-")]


@pytest.mark.build
def test_images_with_the_same_packages_install_them_once(built_examples: Path) -> None:
    log = (built_examples / "build.log").read_text()
    # server and server-btrfs have the same package stage: one stage-cache
    # entry, and at most one mmdebstrap run between them (none when the
    # cache already had it), even though they build at the same time.
    manifests = {
        name: json.loads(output_path(built_examples, name, "manifest").read_text())
        for name in ("server", "server-btrfs", "container")
    }
    keys = {name: m["caches"]["stage_cache"]["key"] for name, m in manifests.items()}
    assert keys["server"] == keys["server-btrfs"] != keys["container"]
    misses = re.findall(r"\[(server(?:-btrfs)?)\]\s+stage cache miss", log)
    assert len(misses) <= 1, misses
    packages = {
        name: json.loads(output_path(built_examples, name, "manifest").read_text())["packages"]
        for name in ("server", "server-btrfs")
    }
    assert packages["server"] == packages["server-btrfs"]


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.mark.build
def test_one_broken_image_leaves_the_others_built_and_fails_the_command(
    built_examples: Path, tmp_path: Path
) -> None:
    space = tmp_path / "space"
    write(space / "classes/app/files/etc/app.conf", "answer = 42\n")
    write(
        space / "classes/broken/scripts/10-fail", "#!/bin/sh\necho 'it broke' >&2\nexit 3\n", 0o755
    )
    write(
        space / "imagesmith.toml",
        """
        [images.good]
        classes = ["app"]
        outputs = ["tar"]

        [images.broken]
        classes = ["app", "broken"]
        outputs = ["tar"]

        [images.also-good]
        classes = ["app"]
        outputs = ["oci"]
        """.replace("        ", ""),
    )
    out = tmp_path / "out"
    result = imagesmith("build", "-C", space, "-o", out, "--all", "-j", "2")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert rows["good"][0] == "ok" and rows["also-good"][0] == "ok", result.stdout
    assert rows["broken"][0] == "FAILED"
    assert "class 'broken' script scripts/10-fail failed with exit code 3" in rows["broken"][2]
    assert "| it broke" in result.stderr
    assert "1 of 3 failed: broken" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "also-good.manifest.json",
        "also-good.oci.tar",
        "good.manifest.json",
        "good.rootfs.tar",
    ]
    # All three share one package installation through the stage cache: one
    # key, and at most one mmdebstrap run (none when the cache had it already).
    misses = re.findall(r"stage cache miss (\w+)", result.stderr)
    hits = re.findall(r"stage cache hit (\w+)", result.stderr)
    assert len(misses) <= 1 and len(misses) + len(hits) == 3, result.stderr[-3000:]
    assert len(set(misses + hits)) == 1


def test_all_and_image_names_together_is_a_usage_error(tmp_path: Path) -> None:
    result = imagesmith("build", "-C", EXAMPLES, "-o", tmp_path, "--all", "server", timeout=60)
    assert result.returncode == 2
    assert "not both" in result.stderr


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    result = imagesmith("build", "-C", EXAMPLES, "-o", tmp_path, "-j", "0", timeout=60)
    assert result.returncode == 2
    assert "at least 1" in result.stderr


def test_summary_all_shows_each_image_target_and_skipped_classes() -> None:
    result = imagesmith("summary", "-C", EXAMPLES, "--all", timeout=60)
    assert result.returncode == 0, result.stderr
    images = result.stdout.split("\nimage ")
    assert len(images) == len(EXAMPLE_IMAGES)
    container = next(i for i in images if i.startswith("container"))
    assert "target: container" in container
    assert re.search(r"^\s+example\s+disk/container\s", container, re.MULTILINE)
    for cls in ("base", "uefi"):
        assert re.search(
            rf"^\s+{cls}\s+disk\s+built-in\s+-- skipped: not for a container image$",
            container,
            re.MULTILINE,
        ), container
    assert "linux-image-amd64" not in container
    legacy = next(i for i in images if i.startswith("legacy"))
    assert "target: disk, booting under bios" in legacy
    assert re.search(r"^\s+1\s+bios\s+-\s+start\s+1MiB\s+size\s+1MiB", legacy, re.MULTILINE)
    hybrid = next(i for i in images if i.startswith("hybrid"))
    assert "target: disk, booting under uefi and bios" in hybrid
