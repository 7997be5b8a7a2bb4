"""Nothing outlives a killed build, and the next run sweeps what it left.

Unit tests run the real `run()` and sweep on small commands and names; the
build tests SIGKILL a real `imagesmith build`, once inside mmdebstrap and
once paused after disk assembly (IMAGESMITH_PAUSE_AFTER_STAGE), and check
that no process of it is left, that the next run removes its files, and that
a live build's files are left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imagesmith.build import WORKDIR_RE
from imagesmith.formats import OUTPUT_TEMP_RE
from imagesmith.host.leftovers import remove_dead_owners
from imagesmith.tree.aptsources import BUILD_DIR_PARENT, BUILD_DIR_RE
from tests.conftest import REPO, empty_stage_cache, imagesmith
from tests.test_build_errors import isolated_env, processes_using


def processes_with(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args", "-ww"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eo" not in line]


def wait_until_gone(marker: str, seconds: float = 10) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


RUN_AND_HANG = """
import sys, threading
from imagesmith.host.run import run
from imagesmith.host.sandbox import private_mounts_argv
argv = sys.argv[1:]
# From a worker thread, as under -j N.
threading.Thread(target=run, args=(private_mounts_argv(argv[1:]) if argv[0] == "ns" else argv,)).start()
"""


@pytest.mark.parametrize(
    "argv",
    [["sleep", "3101"], ["ns", "sh", "-c", "sleep 3102 & sleep 3103; wait"]],
    ids=["child", "namespace-grandchildren"],
)
def test_children_die_with_a_killed_imagesmith(argv: list[str]) -> None:
    if argv[0] == "ns" and os.geteuid() != 0:
        pytest.skip("unshare --pid needs root")
    command = argv[1:] if argv[0] == "ns" else argv
    marker = "sleep 310"
    proc = subprocess.Popen([sys.executable, "-c", RUN_AND_HANG, *argv], cwd=REPO)
    deadline = time.monotonic() + 20
    while len(processes_with(marker)) < (2 if argv[0] == "ns" else 1):
        assert time.monotonic() < deadline, f"{command} did not start"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_until_gone(marker) == []


NO_START_AFTER_STOP = """
from imagesmith.host.run import run, stop_all_processes
run(["true"])
stop_all_processes()
try:
    run(["true"])
except KeyboardInterrupt:
    print("refused")
"""


def test_no_command_starts_after_a_stop() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_START_AFTER_STOP], cwd=REPO, capture_output=True, text=True
    )
    assert result.stdout.strip() == "refused", result.stderr


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_sighup_and_sigterm_clean_up_like_ctrl_c(signum: int) -> None:
    code = textwrap.dedent(f"""
        import os, time
        from imagesmith.cli.main import interrupt_on_sigterm
        interrupt_on_sigterm()
        try:
            os.kill(os.getpid(), {int(signum)})
            time.sleep(5)
        except KeyboardInterrupt:
            print("interrupted")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "interrupted", result.stderr


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_what_dead_builds_left(tmp_path: Path) -> None:
    dead, live = dead_pid(), os.getpid()
    names = {
        f"imagesmith-server-pid{dead}-ab_c1": True,
        f"imagesmith-server-btrfs-pid{dead}-x9": True,
        f"imagesmith-server-pid{live}-ab_c2": False,  # a live build
        "imagesmith-server-h4al1pwf": False,  # no owner in the name: not ours to judge
        "imagesmith-web-01-abcd": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    removed = remove_dead_owners(tmp_path, WORKDIR_RE)
    assert sorted(p.name for p in removed) == sorted(n for n, gone in names.items() if gone)
    for name, gone in names.items():
        assert (tmp_path / name).exists() is not gone
    (tmp_path / f".imagesmith-tmp-{dead}-server.raw").write_bytes(b"half")
    (tmp_path / f".imagesmith-tmp-{live}-server.raw").write_bytes(b"being written")
    assert [p.name for p in remove_dead_owners(tmp_path, OUTPUT_TEMP_RE)] == [
        f".imagesmith-tmp-{dead}-server.raw"
    ]
    assert BUILD_DIR_RE.match(f"imagesmith-build-pid{dead}-0123abcd")


def start_build(
    config: Path, out: Path, work: Path, cache: Path, **env: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagesmith", "build", "-C", str(config), "-o", str(out),
         "--cache-dir", str(cache), "server"],
        cwd=REPO, env={**isolated_env(work), **env}, stdout=subprocess.DEVNULL,
        stderr=(out.parent / "build.log").open("w"),
    )  # fmt: skip


def check_swept_by_next_run(proc: subprocess.Popen[bytes], work: Path, out: Path) -> None:
    """After the kill: nothing runs, the next run removes the dead build's
    files, and a live build's (this test's PID) stay."""
    assert wait_until_gone(str(work), 15) == []
    build_dirs = [p for p in BUILD_DIR_PARENT.glob(f"imagesmith-build-pid{proc.pid}-*")]
    live = work / f"imagesmith-other-pid{os.getpid()}-live1"
    live.mkdir()
    assert any(WORKDIR_RE.match(p.name) for p in work.iterdir()), "the killed build left nothing?"
    result = imagesmith("cache", "prune", "--max-age", "9999d", "--cache-dir", out.parent / "c2",
                        env=isolated_env(work), timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [p.name for p in work.iterdir()] == [live.name]
    assert not any(p.exists() for p in build_dirs)
    assert processes_using(work) == []


@pytest.mark.build
def test_sigkill_during_mmdebstrap_leaves_no_process(config_copy: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    proc = start_build(config_copy, out, work, empty_stage_cache(tmp_path))
    deadline = time.monotonic() + 180
    # apt-get installing into the tree: mmdebstrap is deep in its work.
    while not any(p.split()[0].endswith("apt-get") for p in processes_using(work)):
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "build.log"
        ).read_text()
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    check_swept_by_next_run(proc, work, out)


@pytest.mark.build
def test_sigkill_when_paused_after_assembly_sweeps_the_half_output(
    config_copy: Path, tmp_path: Path
) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    proc = start_build(config_copy, out, work, empty_stage_cache(tmp_path),
                       IMAGESMITH_PAUSE_AFTER_STAGE="assemble disk")  # fmt: skip
    log = tmp_path / "build.log"
    deadline = time.monotonic() + 600
    while "pausing after assemble disk" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    # Outputs are written in a private directory named with the build's PID.
    (half,) = out.glob(f".imagesmith-tmp-{proc.pid}-*")
    assert (half / "server.raw").is_file()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    check_swept_by_next_run(proc, work, out)
    # The next build into the output directory sweeps it, even one that then
    # fails (here on a script without #!) before any work.
    script = config_copy / "classes/example/scripts/20-no-shebang"
    script.write_text("true\n")
    script.chmod(0o755)
    result = imagesmith("build", "-C", config_copy, "-o", out, "--cache-dir", tmp_path / "c3",
                        "server", env=isolated_env(work), timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert not half.exists() and f"removed {half}" in result.stderr
