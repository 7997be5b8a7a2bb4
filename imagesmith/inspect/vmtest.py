"""`imagesmith test`: boot an image headless in QEMU and check it from inside.

`test` never changes the image: the guest writes to a throwaway qcow2
overlay (unless --in-place). It adds nothing to the image either. The check
runner reaches the guest as systemd credentials in SMBIOS type 11 strings:

- `systemd.extra-unit.imagesmith-check.service`: the unit that runs it;
- `systemd.unit-dropin.multi-user.target`: pulls that unit into the boot;
- `imagesmith.checks`: a tar.gz of the runner, a nonce and user checks.

The runner reports on the second serial port (ttyS1) into a file the host
watches: each check's result and the tail of its output. The first serial
port is the console, logged to a file. The test passes only on the runner's
final PASS line carrying this run's nonce. On timeout or failure, QEMU is
stopped and the console's tail is shown. `write_report()` keeps every
check's output as JSON, for checks that read values out of the guest.
Needs systemd 256 or newer in the guest (trixie and later).

Under `uefi-secureboot` the runner also checks that Secure Boot is on in
the guest, and a boot that OVMF or shim refuses (a binary whose signature
does not verify) ends at once as "refused", with the console's line.

QEMU's own failures are survived: KVM that cannot run the guest here falls
back to TCG, and TCG's code-patching race (qemu.py) boots again with one vCPU.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagesmith import log
from imagesmith.errors import ConfigError
from imagesmith.host.run import format_command, require_tools, stop_process
from imagesmith.inspect.qemu import (
    KVM_FAILURE,
    SEABIOS_BOOTING,
    SEABIOS_KVM_GRACE,
    TCG_CODE_PATCH_RACE,
    VCPUS,
    Enrolment,
    die_with_parent,
    pick_accel,
    pick_firmware,
    qemu_argv,
    vm_scratch,
)
from imagesmith.inspect.screen import MIN_COLOURS, distinct_colours, screendump

GUEST_DIR = Path(__file__).parent.parent / "data" / "guest"
# A desktop needs room: Plasma under TCG with 1 GiB swaps itself to a halt.
GRAPHICAL_MEMORY = 4096
GREETER_DRAW = 300.0  # seconds a greeter may take to draw itself after it starts
GREETER_POLL = 10.0
CHECK_UNIT = """\
[Unit]
Description=imagesmith test checks
ConditionPathExists=!/etc/initrd-release
After=multi-user.target

[Service]
Type=oneshot
LoadCredential=imagesmith.checks
# initramfs-tools leaves /run mounted noexec: the checks get a tmpfs of their own.
ExecStart=/bin/sh -c 'mkdir -p /run/imagesmith-check && \
mount -t tmpfs -o mode=0700 imagesmith-check /run/imagesmith-check && \
tar -xzf "$CREDENTIALS_DIRECTORY/imagesmith.checks" -C /run/imagesmith-check && \
exec /run/imagesmith-check/run-checks'
StandardOutput=journal+console
"""
UNIT_FAILED = "Failed to start imagesmith-check.service"
# Console (or SeaBIOS log) lines after which the guest will never report: the
# test stops at once and shows them, instead of waiting out the timeout.
BOOT_FAILURES = (
    ("the firmware found nothing to boot", re.compile(r"No bootable device|not a bootable disk")),
    ("the firmware fell through to network boot (PXE)",
     re.compile(r"Booting from ROM|Start PXE over IPv|Start HTTP Boot over IPv|iPXE initialising")),
    ("GRUB stopped at its prompt", re.compile(r"^\s*grub(?: rescue)?> ", re.MULTILINE)),
    ("the initramfs could not mount the root and dropped to its shell",
     re.compile(r"ALERT! .*|Dropping to a shell|^\(initramfs\) ", re.MULTILINE)),
    ("the kernel panicked", re.compile(r"Kernel panic - not syncing.*")),
)  # fmt: skip
CHECK_DROPIN = "[Unit]\nWants=imagesmith-check.service\n"
# OVMF: "failed to load Boot0002 ...: Access Denied"; shim: "Verification
# failed: (0x1A) Security Violation" for a second stage it will not start.
SECURE_BOOT_REFUSAL = re.compile(
    r"^.*(?:Access Denied|Security Violation|Verification failed).*$", re.MULTILINE
)
KERNEL_START = "Linux version"
# In the checks payload: the guest must report Secure Boot on.
EXPECT_SECURE_BOOT = "expect-secure-boot"


@dataclass
class CheckResult:
    name: str
    passed: bool
    output: list[str] = field(default_factory=list)  # its last lines, stdout and stderr


@dataclass
class TestResult:
    image: Path
    passed: bool
    reason: str
    checks: list[CheckResult] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    console_tail: list[str] = field(default_factory=list)
    duration: float = 0.0
    accel: str = ""
    firmware: str = ""

    def summary(self) -> str:
        lines = [
            f"{'PASS' if self.passed else 'FAIL'} {self.image} "
            f"({self.duration:.0f}s, {self.firmware}, {self.accel}): {self.reason}"
        ]
        for check in self.checks:
            lines.append(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}")
            if not check.passed:
                lines += [f"  | {line}" for line in check.output[-30:]]
        lines += self.details
        if not self.passed and self.console_tail:
            lines.append("  console (last lines):")
            lines += [f"  > {line}" for line in self.console_tail]
        return "\n".join(lines)


def checks_payload(
    nonce: str, checks_dir: Path | None, *, secure_boot: bool = False, graphical: bool = False
) -> bytes:
    """tar.gz of the runner, the nonce, what to expect (Secure Boot on, a
    display manager) and the user's check scripts."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(GUEST_DIR / "run-checks", arcname="run-checks")
        files = {"nonce": nonce.encode()}
        if secure_boot:
            files[EXPECT_SECURE_BOOT] = b"1\n"
        if graphical:
            files["graphical"] = b"1\n"
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if checks_dir is not None:
            if not checks_dir.is_dir():
                raise ConfigError(f"{checks_dir}: --checks must be a directory")
            tar.add(checks_dir, arcname="checks")
    return buffer.getvalue()


def credential(name: str, data: bytes) -> str:
    return f"io.systemd.credential.binary:{name}={base64.b64encode(data).decode()}"


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def test_image(
    image: Path,
    *,
    checks_dir: Path | None = None,
    timeout: int = 300,
    memory: int = 1024,
    in_place: bool = False,
    console_log: Path | None = None,
    firmware: str | None = None,
    screenshot: Path | None = None,
    enrolments: Sequence[Enrolment] = (),
) -> TestResult:
    """Boot and check; with `screenshot`, the guest gets a display, the
    display manager and its greeter are checked, and a PNG of the screen is
    saved there once the checks are done."""
    require_tools("qemu-system-x86_64", "qemu-img")
    firmware = pick_firmware(image, firmware)
    nonce = secrets.token_hex(8)
    graphical = screenshot is not None
    if graphical:
        memory = max(memory, GRAPHICAL_MEMORY)
    smbios = [
        credential("systemd.extra-unit.imagesmith-check.service", CHECK_UNIT.encode()),
        credential("systemd.unit-dropin.multi-user.target", CHECK_DROPIN.encode()),
        credential(
            "imagesmith.checks",
            checks_payload(
                nonce, checks_dir, secure_boot=firmware == "uefi-secureboot", graphical=graphical
            ),
        ),
    ]
    started = time.monotonic()
    accel, vcpus = pick_accel(firmware), VCPUS
    while True:
        # Every attempt boots a fresh overlay and firmware variables.
        with vm_scratch(image, in_place=in_place, firmware=firmware, enrolments=enrolments) as vm:
            scratch = vm.scratch
            console, report = scratch / "console.log", scratch / "checks.log"
            firmware_log = scratch / "firmware.log" if firmware == "bios" else None
            argv = qemu_argv(
                disk=vm.disk, disk_fmt=vm.disk_fmt, firmware_code=vm.firmware_code,
                firmware_vars=vm.firmware_vars, accel=accel, memory=memory, vcpus=vcpus,
                serial=[f"file:{console}", f"file:{report}"], smbios=smbios,
                firmware_log=firmware_log, display="screen" if graphical else "",
                qmp=scratch / "qmp.sock" if graphical else None,
                secure_boot=firmware == "uefi-secureboot",
            )  # fmt: skip
            log.info(f"testing {image} under QEMU ({firmware}, {accel}), timeout {timeout}s")
            result = watch_vm(
                argv, console, report, nonce, timeout, scratch,
                kvm=accel == "kvm", firmware_log=firmware_log,
                tcg_race=accel == "tcg" and vcpus > 1,
                screenshot=scratch / "screen.png" if graphical else None,
                secure_boot=firmware == "uefi-secureboot",
            )  # fmt: skip
            if result == "kvm-failed" and accel == "kvm":
                why = KVM_FAILURE.search(read_text(scratch / "qemu.err"))
                log.warn(
                    f"KVM cannot run this guest here ({why.group(0) if why else 'firmware hangs'}); "
                    "falling back to TCG"
                )
                accel = "tcg"
                continue
            if result == "tcg-race":
                log.warn(
                    "the guest kernel oopsed on a code-patching race of multi-threaded TCG "
                    f"({TCG_CODE_PATCH_RACE!r}, a QEMU limitation); booting again with one vCPU"
                )
                vcpus = 1
                continue
            if console_log is not None:
                shutil.copyfile(console, console_log)
            test = test_result(image, result, nonce, scratch, started, accel, firmware, timeout)
            if screenshot is not None:
                keep_screenshot(test, scratch / "screen.png", screenshot)
            return test


def photograph_greeter(qmp: Path, target: Path, deadline: float) -> None:
    """Photograph the screen until it shows a drawn greeter or GREETER_DRAW
    seconds have passed: under software emulation, a greeter's process runs
    long before its first frame is on the screen."""
    until = min(deadline, time.monotonic() + GREETER_DRAW)
    while True:
        screendump(qmp, target)
        if distinct_colours(target) >= MIN_COLOURS or time.monotonic() > until:
            return
        time.sleep(GREETER_POLL)


def keep_screenshot(test: TestResult, taken: Path, target: Path) -> None:
    """Save the PNG; a screen with too few colours to be a greeter fails the test."""
    if not taken.is_file():
        test.passed = False
        test.details.append("  no screenshot: the guest never finished its checks")
        return
    shutil.copyfile(taken, target)
    colours = distinct_colours(taken)
    test.details.append(f"  screenshot {target}: {colours} distinct colours")
    if colours < MIN_COLOURS:
        test.passed = False
        test.reason = f"the screen is (nearly) blank: {colours} colours"


def test_result(
    image: Path,
    result: str,
    nonce: str,
    scratch: Path,
    started: float,
    accel: str,
    firmware: str,
    timeout: int,
) -> TestResult:
    """What `watch_vm` saw and the guest reported, as a TestResult."""
    report = read_text(scratch / "checks.log")
    console = read_text(scratch / "console.log")
    passed = result == "done" and parse_report(report, nonce) == "PASS"
    reasons = {
        "done": "all checks passed in the guest" if passed else "checks failed in the guest",
        "timeout": f"no result from the guest within {timeout}s",
        "exited": "QEMU exited before the guest reported",
        "check-unit-failed": "the check runner could not start in the guest (see console)",
        "refused": "Secure Boot refused to start the boot path (see console)",
    }
    test = TestResult(
        image=image,
        passed=passed,
        reason=reasons.get(result, result),
        checks=parse_checks(report, nonce),
        console_tail=console.splitlines()[-30:],
        duration=time.monotonic() - started,
        accel=accel,
        firmware=firmware,
    )
    if result == "exited":
        test.details += read_text(scratch / "qemu.err").splitlines()[-10:]
    if result == "refused" and (m := SECURE_BOOT_REFUSAL.search(plain_text(console))):
        test.details.append(f"  refused: {m.group(0).strip()}")
    if result == "boot-failed":
        logs = read_text(scratch / "console.log"), read_text(scratch / "firmware.log")
        if seen := boot_failure(*logs):
            test.reason = f"the image did not boot: {seen[0]}"
            test.details += [f"  decided by: {line}" for line in seen[1]]
    return test


def watch_vm(
    argv: list[str],
    console: Path,
    report: Path,
    nonce: str,
    timeout: int,
    scratch: Path,
    *,
    kvm: bool,
    firmware_log: Path | None = None,
    tcg_race: bool = False,
    screenshot: Path | None = None,
    secure_boot: bool = False,
) -> str:
    """Run QEMU until the guest reports, QEMU exits, or the timeout.

    Under `kvm`, QEMU's KVM errors end the boot as "kvm-failed", and with a
    `firmware_log` (SeaBIOS), so does a BIOS that has not started booting
    the disk within SEABIOS_KVM_GRACE seconds. With `tcg_race` (TCG with
    more than one vCPU), a guest oops from TCG's code-patching race ends
    the boot at once as "tcg-race", for the caller to boot again with one.
    With `secure_boot`, OVMF's or shim's refusal ends it as "refused".
    """
    log.debug(format_command(argv))
    started = time.monotonic()
    deadline = started + timeout
    qemu_err = scratch / "qemu.err"
    with qemu_err.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        try:
            while True:
                exited = proc.poll() is not None  # before reading: no output lost
                if parse_report(read_text(report), nonce):
                    if screenshot is not None and not exited:
                        photograph_greeter(scratch / "qmp.sock", screenshot, deadline)
                    return "done"
                text = read_text(console)
                if UNIT_FAILED in text:
                    return "check-unit-failed"
                if tcg_race and TCG_CODE_PATCH_RACE in text:
                    return "tcg-race"
                # Only the firmware's and shim's words count, not the kernel's.
                if secure_boot and SECURE_BOOT_REFUSAL.search(text.partition(KERNEL_START)[0]):
                    return "refused"
                if boot_failure(text, read_text(firmware_log) if firmware_log else ""):
                    return "boot-failed"
                # On a KVM internal error QEMU pauses the guest and lives on.
                if kvm and KVM_FAILURE.search(read_text(qemu_err)):
                    return "kvm-failed"
                if (
                    kvm
                    and firmware_log is not None
                    and time.monotonic() - started > SEABIOS_KVM_GRACE
                    and SEABIOS_BOOTING not in read_text(firmware_log)
                ):
                    return "kvm-failed"
                if exited:
                    return "exited"
                if time.monotonic() > deadline:
                    return "timeout"
                time.sleep(0.5)
        finally:
            stop_process(proc)


def boot_failure(*texts: str) -> tuple[str, list[str]] | None:
    """(what went wrong, the lines that show it) when a console or firmware
    log shows a boot that cannot reach the check runner, else None."""
    for text in texts:
        for what, pattern in BOOT_FAILURES:
            lines = [line for line in text.splitlines() if pattern.search(line + "\n")]
            if lines:
                return what, [line.strip() for line in lines[:5]]
    return None


def plain_text(console: str) -> str:
    """Console text without terminal escapes and box drawing: shim draws its errors."""
    text = re.sub(r"\x1b\[[0-9;?=]*[A-Za-z]", "\n", console)
    return re.sub(r"[^\x20-\x7e\n]+", "\n", text)


def parse_report(text: str, nonce: str) -> str:
    match = re.search(rf"^IMAGESMITH-RESULT {nonce} (PASS|FAIL)\s*$", text, re.MULTILINE)
    return match.group(1) if match else ""


def parse_checks(text: str, nonce: str) -> list[CheckResult]:
    """Each check's result line, and the "  | " output lines that follow it."""
    checks: list[CheckResult] = []
    result_line = re.compile(rf"^IMAGESMITH-CHECK {nonce} (PASS|FAIL) (\S+)")
    for line in text.splitlines():
        if m := result_line.match(line):
            checks.append(CheckResult(m.group(2), m.group(1) == "PASS"))
        elif line.startswith("  | ") and checks:
            checks[-1].output.append(line[4:].rstrip("\r"))
        elif line.rstrip("\r") == "  |" and checks:
            checks[-1].output.append("")
    return checks


def write_report(result: TestResult, target: Path) -> None:
    """The test's outcome and every check's output, as JSON."""
    data = {
        "image": str(result.image),
        "passed": result.passed,
        "reason": result.reason,
        "duration": round(result.duration, 1),
        "accel": result.accel,
        "firmware": result.firmware,
        "checks": [{"name": c.name, "passed": c.passed, "output": c.output} for c in result.checks],
    }
    target.write_text(json.dumps(data, indent=2) + "\n")
