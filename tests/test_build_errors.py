"""Bad input fails clearly and leaves nothing behind.

Config errors fail before any slow work with exit code 2, naming the file and
key. A failing class script fails the build naming the class, the script and
its output; Ctrl-C in the middle of the package stage exits 130. Neither leaves
mounts, processes, scratch directories or partial outputs, and an earlier
good image at the output path survives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, empty_stage_cache, imagesmith


def leftovers(workdir: Path) -> list[str]:
    """Scratch files, mounts and processes a build in `workdir` left behind."""
    found = [str(p) for p in workdir.iterdir()] if workdir.exists() else []
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    found += [line for line in mounts if str(workdir) in line]
    return found + processes_using(workdir)


def processes_using(workdir: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args", "-ww"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(workdir) in line]


def isolated_env(workdir: Path) -> dict[str, str]:
    """Build scratch in a directory of this test's own, so checks are exact."""
    workdir.mkdir(exist_ok=True)
    return {**os.environ, "IMAGESMITH_WORKDIR": str(workdir)}


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("imagesmith.toml", "[images.server]\n", '[images.server]\nsizee = "3GiB"\n'),
            r"imagesmith\.toml:\d+: \[images\.server\] sizee: unknown setting 'sizee'",
        ),
        (
            ("imagesmith.toml", '"example"]', '"example", "no-such-class"]'),
            r"imagesmith\.toml:\d+: unknown class 'no-such-class'",
        ),
        (
            ("imagesmith.toml", 'size = "2GiB"\noutputs', "size = 2.5\noutputs"),
            r"imagesmith\.toml:\d+: \[images\.server\] size: expected a size",
        ),
        (
            ("imagesmith.toml", 'size = "2GiB"\noutputs', 'size = "300MiB"\noutputs'),
            r"\[images\.server\] size: a 300MiB disk leaves .* hint: set size to at least",
        ),
        (
            ("imagesmith.toml", 'size = "2GiB"\noutputs', 'size = "100TiB"\noutputs'),
            r"imagesmith\.toml \[images\.server\] size: a 100TiB disk: the filesystem of "
            r".*/out cannot hold a file that large \(File too large\).*hint: set a smaller size",
        ),
        (
            ("classes/example/class.toml", "[packages]", "[packages]\ninstal = []"),
            r"class\.toml:\d+: unknown key 'instal' in \[packages\]",
        ),
        (
            ("imagesmith.toml", "[defaults]", '[defaults]\nfilesystem = "zfs"'),
            r"imagesmith\.toml:\d+: \[defaults\] filesystem: 'zfs' is not one of ext4, btrfs",
        ),
    ],
    ids=[
        "unknown-key",
        "unknown-class",
        "wrong-type",
        "size-too-small",
        "size-beyond-the-output-filesystem",
        "class-key-typo",
        "bad-choice",
    ],
)
def test_config_errors_exit_2_before_any_work(
    config_copy: Path, tmp_path: Path, edit: tuple[str, str, str], expected: str
) -> None:
    name, old, new = edit
    if "100TiB" in new and fs_type(tmp_path) != "ext2/ext3":
        pytest.skip("needs the temp directory on ext4, where a file stops at 16TiB")
    path = config_copy / name
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    work = tmp_path / "work"
    result = imagesmith(
        "build",
        "-C",
        config_copy,
        "-o",
        tmp_path / "out",
        "server",
        timeout=60,
        env=isolated_env(work),
    )
    assert result.returncode == 2, result.stderr
    assert re.search(expected, result.stderr, re.DOTALL), result.stderr
    assert str(config_copy) in result.stderr
    assert "==> bootstrap" not in result.stderr
    assert leftovers(work) == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def fs_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", path], capture_output=True, text=True
    ).stdout.strip()


def test_unknown_image_and_summary_errors(config_copy: Path) -> None:
    result = imagesmith("summary", "-C", config_copy, "nope", timeout=60)
    assert result.returncode == 2
    assert "no image named 'nope'" in result.stderr and "server" in result.stderr
    result = imagesmith("summary", "-C", config_copy / "missing", timeout=60)
    assert result.returncode == 2 and "not found" in result.stderr


def test_build_refuses_a_script_without_shebang_like_lint(
    config_copy: Path, tmp_path: Path
) -> None:
    script = config_copy / "classes/example/scripts/20-no-shebang"
    write(script, "false\necho carried on\n", 0o755)
    work = tmp_path / "work"
    result = imagesmith(
        "build", "-C", config_copy, "-o", tmp_path / "out", "server",
        timeout=60, env=isolated_env(work),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{script}:1: no #! line: the script cannot be executed" in result.stderr
    assert "==> bootstrap" not in result.stderr and leftovers(work) == []
    linted = imagesmith("lint", "-C", config_copy, timeout=60)
    assert f"{script}:1: no #! line: the script cannot be executed" in linted.stdout


def add_class(space: Path, name: str, script: str) -> None:
    write(space / "classes" / name / "scripts" / "10-fail", script, 0o755)
    config = space / "imagesmith.toml"
    config.write_text(config.read_text().replace('"example"]', f'"example", "{name}"]', 1))


@pytest.mark.build
def test_failing_script_fails_the_build_and_keeps_the_old_image(
    built_examples: Path, config_copy: Path, tmp_path: Path
) -> None:
    add_class(
        config_copy,
        "broken",
        "#!/bin/sh\necho 'preparing things'\necho 'something went wrong' >&2\nexit 4\n",
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "server.raw").write_bytes(b"an earlier good image")
    work = tmp_path / "work"
    result = imagesmith(
        "-v", "build", "-C", config_copy, "-o", out, "server", env=isolated_env(work)
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "class 'broken' script scripts/10-fail failed with exit code 4" in result.stderr
    assert "| something went wrong" in result.stderr
    assert (out / "server.raw").read_bytes() == b"an earlier good image"
    assert sorted(p.name for p in out.iterdir()) == ["server.raw"]
    assert leftovers(work) == []
    # The same package set was built by the session fixture: with the .deb
    # cache warm, apt downloads no package at all.
    downloads = re.findall(r"Get:\d+ \S+ \S+/\S+ \S+ (\S+) \S+ \S+ \[", result.stderr)
    assert downloads == [], downloads[:10]


@pytest.mark.build
def test_ctrl_c_during_packages_leaves_nothing(
    built_examples: Path, config_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "server.raw").write_bytes(b"an earlier good image")
    work = tmp_path / "work"
    env = isolated_env(work)
    # No stage entry to reuse, so mmdebstrap runs and is interrupted.
    cache = empty_stage_cache(tmp_path)
    log = tmp_path / "build.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagesmith", "build", "-C", str(config_copy), "-o", str(out),
             "--cache-dir", str(cache), "server"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while "==> bootstrap and packages" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(6)  # well inside mmdebstrap: packages are being installed
        assert any("mmdebstrap" in p for p in processes_using(work)), "mmdebstrap should be running"
        # What a terminal's Ctrl-C does: SIGINT to the whole foreground group.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
    assert "interrupted" in log.read_text()
    assert leftovers(work) == []
    assert sorted(p.name for p in out.iterdir()) == ["server.raw"]
    assert (out / "server.raw").read_bytes() == b"an earlier good image"
    # Nor a stage entry a later build could take for complete.
    assert not [p for p in (cache / "stages").glob("*") if not p.name.startswith(".")]


SLOW_STAGE_SAVE = """#!/usr/bin/python3
import os, sys, time
if any(a.startswith({cache!r}) for a in sys.argv):  # the stage cache's tar
    time.sleep(600)
os.execv("/usr/bin/tar", ["tar", *sys.argv[1:]])
"""


@pytest.mark.build
def test_ctrl_c_while_the_stage_is_saved_in_the_background_stops_the_save(
    built_examples: Path, config_copy: Path, tmp_path: Path
) -> None:
    """After mmdebstrap, the stage's tar is written in the background while
    the classes work. A SIGINT to imagesmith alone (as a SIGTERM would come)
    must stop that tar rather than wait for it, and leave no entry, whole or
    partial. The host's tar is slowed for the cache's tar only, so the
    signal surely lands in the middle of the save."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "server.raw").write_bytes(b"an earlier good image")
    work = tmp_path / "work"
    cache = empty_stage_cache(tmp_path)
    shim = tmp_path / "bin" / "tar"
    write(shim, SLOW_STAGE_SAVE.format(cache=str(cache / "stages")), 0o755)
    env = {**isolated_env(work), "PATH": f"{shim.parent}:{os.environ['PATH']}"}
    log = tmp_path / "build.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagesmith", "-v", "build", "-C", str(config_copy),
             "-o", str(out), "--cache-dir", str(cache), "server"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not [p for p in processes_using(cache) if f"{shim} -c" in p]:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGINT)
            # The tar would sleep for ten minutes: waiting for it fails here.
            assert proc.wait(timeout=90) == 130, log.read_text()[-2000:]
        finally:
            if proc.poll() is None:  # failed: Ctrl-C the whole group, as a terminal would
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=120)
    text = log.read_text()
    assert "interrupted" in text
    assert "package stage saved to the cache" not in text
    assert leftovers(work) == []
    assert processes_using(cache) == []
    stages = cache / "stages"
    assert [p.name for p in stages.iterdir() if p.is_dir()] == []
    assert sorted(p.name for p in out.iterdir()) == ["server.raw"]
    assert (out / "server.raw").read_bytes() == b"an earlier good image"


@pytest.mark.build
@pytest.mark.parametrize("name", ["server", "server-btrfs"])
def test_a_full_output_disk_is_a_clear_error_and_leaves_the_old_image(
    built_examples: Path, tmp_path: Path, name: str
) -> None:
    """A disk that fills up mid-build says so with the free space of each
    place and a hint, never as an internal error, whether a command (mkfs.ext4
    writing into the disk) or imagesmith itself (placing the btrfs made in
    scratch) hits it. No half-written output stays; the earlier image survives."""
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "imagesmith-full", out], check=True)
    try:
        old = out / f"{name}.raw"
        old.write_bytes(b"an earlier good image")
        work = tmp_path / "work"
        result = imagesmith(
            "build", "-C", REPO / "examples", "-o", out, name, env=isolated_env(work)
        )
        assert result.returncode == 1, result.stderr[-2000:]
        assert "internal error" not in result.stderr
        assert re.search(r"(?i)no space left on (the )?device", result.stderr)
        assert re.search(rf"\(output {out}: [\d.]+\w+ free; scratch ", result.stderr), (
            result.stderr[-2000:]
        )
        assert "hint: free some room" in result.stderr
        assert old.read_bytes() == b"an earlier good image"
        assert [p.name for p in out.iterdir()] == [old.name]
        assert leftovers(work) == []
    finally:
        subprocess.run(["umount", out], check=True)
