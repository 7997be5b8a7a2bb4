"""How `imagesmith test` copes with QEMU failing for reasons of its own.

QEMU's failures cannot be produced on demand: KVM refusing a guest depends on
the host, and multi-threaded TCG's race with the guest kernel's code patching
strikes about one boot in dozens. So here a stand-in `qemu-system-x86_64` on
PATH plays them back, and the real `test_image` must react: fall back from
KVM to TCG, boot again with one vCPU after the race, and pass only on the
guest's report with the run's nonce. Booting real images is tested elsewhere.
"""

from __future__ import annotations

import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from imagesmith.inspect import vmtest as qemu

# Plays one QEMU run per line of $FAKE_QEMU_SCRIPT (consumed in order):
#   msr    - says KVM refused an MSR and exits 1, as QEMU 7.2 does on some hosts
#   oops   - the guest console shows the TCG code-patching oops, then hangs
#   pass   - the guest reports PASS with the nonce from the SMBIOS credential
# Every run is logged with its -accel/-smp to $FAKE_QEMU_LOG.
FAKE_QEMU = textwrap.dedent(
    """\
    #!/usr/bin/env python3
    import base64, io, os, sys, tarfile, time
    argv = sys.argv[1:]
    script = os.environ["FAKE_QEMU_SCRIPT"]
    steps = open(script).read().split()
    open(script, "w").write(" ".join(steps[1:]))
    opt = lambda name: [argv[i + 1] for i, a in enumerate(argv) if a == name]
    serials = [s.removeprefix("file:") for s in opt("-serial")]
    with open(os.environ["FAKE_QEMU_LOG"], "a") as log:
        log.write(f"{opt('-machine')[0]} smp={opt('-smp')[0]}\\n")
    step = steps[0]
    if step == "msr":
        print("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69", flush=True)
        sys.exit(1)
    if step == "oops":
        open(serials[0], "w").write("[    2.86] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\\n")
        time.sleep(600)
    prefix = "io.systemd.credential.binary:imagesmith.checks="
    payload = next(v for v in opt("-smbios") if prefix in v).split(prefix, 1)[1]
    tar = tarfile.open(fileobj=io.BytesIO(base64.b64decode(payload)))
    nonce = tar.extractfile("nonce").read().decode()
    open(serials[1], "w").write(f"IMAGESMITH-RESULT {nonce} PASS\\n")
    time.sleep(600)
    """
)


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-system-x86_64"
    fake.write_text(FAKE_QEMU)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_QEMU_LOG", str(tmp_path / "runs.log"))
    monkeypatch.setenv("FAKE_QEMU_SCRIPT", str(tmp_path / "script"))
    return tmp_path


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    image = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "1M"], check=True)
    return image


def play(
    fake_qemu: Path, disk: Path, steps: str, accel: str, timeout: int = 60
) -> tuple[qemu.TestResult, list[str]]:
    """Run the real `test_image` against the stand-in playing `steps`."""
    (fake_qemu / "script").write_text(steps)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IMAGESMITH_ACCEL", accel)
        result = qemu.test_image(disk, firmware="bios", timeout=timeout)
    return result, (fake_qemu / "runs.log").read_text().splitlines()


def test_kvm_refused_at_start_falls_back_to_tcg(fake_qemu: Path, disk: Path) -> None:
    result, runs = play(fake_qemu, disk, "msr pass", "kvm")
    assert result.passed, result.summary()
    assert result.accel == "tcg"
    assert runs == ["q35,accel=kvm smp=2", "q35,accel=tcg smp=2"]


def test_tcg_code_patching_race_boots_again_with_one_vcpu(fake_qemu: Path, disk: Path) -> None:
    result, runs = play(fake_qemu, disk, "oops pass", "tcg")
    assert result.passed, result.summary()
    assert runs == ["q35,accel=tcg smp=2", "q35,accel=tcg smp=1"]


def test_the_race_is_retried_once_only(fake_qemu: Path, disk: Path) -> None:
    """With one vCPU the oops is not TCG's race: the test fails on it."""
    result, runs = play(fake_qemu, disk, "oops oops", "tcg", timeout=3)
    assert not result.passed
    assert "no result from the guest within 3s" in result.reason
    assert any("Oops: int3" in line for line in result.console_tail)
    assert runs == ["q35,accel=tcg smp=2", "q35,accel=tcg smp=1"]


def test_a_qemu_that_exits_is_a_failure_not_a_retry(fake_qemu: Path, disk: Path) -> None:
    result, runs = play(fake_qemu, disk, "msr", "tcg")
    assert not result.passed
    assert result.reason == "QEMU exited before the guest reported"
    assert runs == ["q35,accel=tcg smp=2"]


def test_a_killed_tests_vm_scratch_is_swept_by_the_next(
    fake_qemu: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    scratch_parent = fake_qemu / "tmp"
    scratch_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_parent))
    done = subprocess.Popen(["true"])
    done.wait()
    dead = scratch_parent / f"imagesmith-vm-pid{done.pid}-abc1"
    live = scratch_parent / f"imagesmith-vm-pid{os.getpid()}-abc2"
    for path in (dead, live):
        (path / "disk.qcow2").parent.mkdir()
        (path / "disk.qcow2").write_bytes(b"overlay")
    result, _ = play(fake_qemu, disk, "pass", "tcg")
    assert result.passed, result.summary()
    assert not dead.exists() and live.exists()
