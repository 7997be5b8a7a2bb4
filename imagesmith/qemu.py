"""Boot images in QEMU: `imagesmith boot` and `imagesmith test`.

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

Firmware: UEFI is OVMF in pflash; BIOS is QEMU's own SeaBIOS (no pflash).
The default is what the manifest beside the image (IMAGE.manifest.json)
records, the first of its firmware for a hybrid image, else UEFI. A
`.raw.zst` image is decompressed into the scratch directory first.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imagesmith import log
from imagesmith.errors import ConfigError
from imagesmith.run import format_command, require_tools, run, stop_process

GUEST_DIR = Path(__file__).parent / "data" / "guest"
FIRMWARE_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)
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
# QEMU's words when KVM cannot run this guest here: it pauses the guest on an
# internal error, or aborts at start (an MSR the host refuses).
KVM_FAILURE = re.compile(
    r"KVM internal error|emulation failure|failed to initialize kvm|failed to set MSR|kvm\.c:\d+",
    re.I,
)
# Multi-threaded TCG can lose a race with the guest kernel patching its own
# code (int3-based text_poke): the guest oopses on a stale breakpoint. It is
# QEMU's, not the image's; one vCPU cannot race, so the test boots again so.
TCG_CODE_PATCH_RACE = "Oops: int3"
VCPUS = 2
KVM_START_GRACE = 10.0
# A second guard for BIOS boots under KVM: SeaBIOS gets to this line in a
# second or two; without it by then, KVM cannot run it and we use TCG.
SEABIOS_BOOTING = "Booting from Hard Disk"
SEABIOS_KVM_GRACE = 10.0
UNIT_FAILED = "Failed to start imagesmith-check.service"
CHECK_DROPIN = "[Unit]\nWants=imagesmith-check.service\n"


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when imagesmith dies, however it
    dies, so no QEMU outlives the test that started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def find_firmware() -> tuple[Path, Path]:
    for code, variables in FIRMWARE_PAIRS:
        if os.path.exists(code) and os.path.exists(variables):
            return Path(code), Path(variables)
    raise ConfigError(
        "no UEFI firmware (OVMF) found",
        hint="run `make setup`, which installs the ovmf package",
    )


# Hardware KVM runs a BIOS's real-mode code; software KVM implementations
# (kvm_pvm, found on some cloud VMs) hang in SeaBIOS or in GRUB's boot.img
# without a word.
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")
SYS_MODULE = Path("/sys/module")


def pick_accel(firmware: str = "uefi") -> str:
    """KVM when it is usable and not disabled; else TCG software emulation.

    IMAGESMITH_ACCEL=tcg|kvm forces a choice. Some hosts expose /dev/kvm but
    cannot run OVMF under it; `test_image` falls back to TCG when KVM dies.
    A BIOS boot uses KVM only where it is hardware KVM.
    """
    forced = os.environ.get("IMAGESMITH_ACCEL", "")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    if firmware == "bios" and not any((SYS_MODULE / m).exists() for m in HARDWARE_KVM_MODULES):
        return "tcg"
    return "kvm"


FIRMWARES = ("uefi", "bios")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
IMAGE_SUFFIXES = (".raw.zst", ".raw", ".qcow2")


def disk_format(image: Path) -> str:
    with image.open("rb") as f:
        magic = f.read(4)
    return {b"QFI\xfb": "qcow2", ZSTD_MAGIC: "zstd"}.get(magic, "raw")


def manifest_for(image: Path) -> Path:
    """out/NAME.raw (or .qcow2, .raw.zst) -> out/NAME.manifest.json."""
    name = image.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    return image.with_name(f"{name}.manifest.json")


def built_firmware(image: Path) -> tuple[str, ...]:
    """The firmware the image was built for, from its manifest; () when unknown."""
    try:
        manifest = json.loads(manifest_for(image).read_text())
    except (OSError, ValueError):
        return ()
    firmware = manifest.get("firmware", [])
    return tuple(f for f in firmware if f in FIRMWARES) if isinstance(firmware, list) else ()


def pick_firmware(image: Path, requested: str | None) -> str:
    """--firmware if given (and the image was built for it), else the manifest's first."""
    built = built_firmware(image)
    if requested is None:
        return built[0] if built else "uefi"
    if requested not in FIRMWARES:
        raise ConfigError(f"--firmware {requested!r}: expected one of {', '.join(FIRMWARES)}")
    if built and requested not in built:
        raise ConfigError(
            f"{image} was built for {' and '.join(built)} only "
            f"({manifest_for(image).name}); it cannot boot under {requested}",
            hint=f"use --firmware {built[0]}, or add the `{requested}` class to the image",
        )
    return requested


def qemu_argv(
    *,
    disk: Path,
    disk_fmt: str,
    firmware_code: Path | None,
    firmware_vars: Path | None,
    accel: str,
    memory: int,
    serial: list[str],
    vcpus: int = VCPUS,
    smbios: list[str] = [],  # noqa: B006 - never mutated
    forwards: dict[int, int] | None = None,  # host port on 127.0.0.1 -> guest TCP port
    firmware_log: Path | None = None,
) -> list[str]:
    """Without firmware_code, QEMU boots its default PC BIOS (SeaBIOS).

    `firmware_log` captures SeaBIOS's debug port (0x402), our signal that
    the BIOS got as far as booting the disk.
    """
    nic = "user,model=virtio-net-pci" + "".join(
        f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in (forwards or {}).items()
    )
    argv = [
        "qemu-system-x86_64",
        "-machine", f"q35,accel={accel}",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(vcpus), "-m", str(memory),
    ]  # fmt: skip
    if firmware_code is not None and firmware_vars is not None:
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,file={firmware_code},readonly=on",
            "-drive", f"if=pflash,format=raw,unit=1,file={firmware_vars}",
        ]  # fmt: skip
    argv += [
        "-drive", f"file={disk},format={disk_fmt},if=virtio",
        "-nic", nic,
        "-display", "none", "-vga", "none",
    ]  # fmt: skip
    if firmware_log is not None:
        argv += [
            "-chardev", f"file,id=firmware-log,path={firmware_log}",
            "-device", "isa-debugcon,iobase=0x402,chardev=firmware-log",
        ]  # fmt: skip
    for chardev in serial:
        argv += ["-serial", chardev]
    for value in smbios:
        argv += ["-smbios", f"type=11,value={value}"]
    return argv


@dataclass
class VmFiles:
    scratch: Path
    disk: Path
    disk_fmt: str
    firmware_code: Path | None  # None: SeaBIOS
    firmware_vars: Path | None


@contextlib.contextmanager
def vm_scratch(image: Path, *, in_place: bool, firmware: str) -> Iterator[VmFiles]:
    """A scratch dir with a copy of the firmware variables and the disk to boot."""
    if not image.is_file():
        raise ConfigError(f"{image}: no such image file")
    code, variables = find_firmware() if firmware == "uefi" else (None, None)
    fmt = disk_format(image)
    if fmt == "zstd" and in_place:
        raise ConfigError(
            f"{image}: a compressed image cannot be booted in place",
            hint="decompress it with `zstd -d` first, or drop --in-place",
        )
    with tempfile.TemporaryDirectory(prefix="imagesmith-vm-") as tmp:
        scratch = Path(tmp)
        vars_copy = None
        if variables is not None:
            vars_copy = scratch / "vars.fd"
            shutil.copyfile(variables, vars_copy)
        disk = image.resolve()
        if fmt == "zstd":
            require_tools("zstd")
            run(
                ["zstd", "-q", "-d", "--sparse", "-o", os.fspath(scratch / "disk.raw"), os.fspath(disk)],
                what="zstd -d (the compressed image)",
            )  # fmt: skip
            disk, fmt = scratch / "disk.raw", "raw"
        if not in_place:
            overlay = scratch / "overlay.qcow2"
            run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", os.fspath(disk), os.fspath(overlay)],
                what="qemu-img create (overlay)",
            )  # fmt: skip
            disk, fmt = overlay, "qcow2"
        yield VmFiles(scratch, disk, fmt, code, vars_copy)


def boot_interactive(
    image: Path,
    *,
    memory: int,
    snapshot: bool,
    ssh_port: int | None = None,
    firmware: str | None = None,
) -> int:
    require_tools("qemu-system-x86_64", "qemu-img")
    firmware = pick_firmware(image, firmware)
    accel = pick_accel(firmware)
    while True:
        with vm_scratch(image, in_place=not snapshot, firmware=firmware) as vm:
            argv = qemu_argv(
                disk=vm.disk, disk_fmt=vm.disk_fmt, firmware_code=vm.firmware_code,
                firmware_vars=vm.firmware_vars, accel=accel, memory=memory,
                serial=["mon:stdio"], forwards={ssh_port: 22} if ssh_port else None,
            )  # fmt: skip
            log.info(f"booting {image} under {firmware}, {accel} (Ctrl-A X quits QEMU)")
            log.debug(format_command(argv))
            started = time.monotonic()
            code = run(argv, interactive=True, check=False).returncode
        # QEMU that dies at once under KVM could not use it (QEMU said why above).
        if accel == "kvm" and code != 0 and time.monotonic() - started < KVM_START_GRACE:
            log.warn("QEMU failed at once under KVM; booting again with TCG")
            accel = "tcg"
            continue
        return code


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


def checks_payload(nonce: str, checks_dir: Path | None) -> bytes:
    """tar.gz of the runner, the nonce and the user's check scripts."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(GUEST_DIR / "run-checks", arcname="run-checks")
        data = nonce.encode()
        info = tarfile.TarInfo("nonce")
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
) -> TestResult:
    require_tools("qemu-system-x86_64", "qemu-img")
    firmware = pick_firmware(image, firmware)
    nonce = secrets.token_hex(8)
    smbios = [
        credential("systemd.extra-unit.imagesmith-check.service", CHECK_UNIT.encode()),
        credential("systemd.unit-dropin.multi-user.target", CHECK_DROPIN.encode()),
        credential("imagesmith.checks", checks_payload(nonce, checks_dir)),
    ]
    started = time.monotonic()
    accel, vcpus = pick_accel(firmware), VCPUS
    while True:
        # Every attempt boots a fresh overlay and firmware variables.
        with vm_scratch(image, in_place=in_place, firmware=firmware) as vm:
            scratch = vm.scratch
            console, report = scratch / "console.log", scratch / "checks.log"
            firmware_log = scratch / "firmware.log" if firmware == "bios" else None
            argv = qemu_argv(
                disk=vm.disk, disk_fmt=vm.disk_fmt, firmware_code=vm.firmware_code,
                firmware_vars=vm.firmware_vars, accel=accel, memory=memory, vcpus=vcpus,
                serial=[f"file:{console}", f"file:{report}"], smbios=smbios,
                firmware_log=firmware_log,
            )  # fmt: skip
            log.info(f"testing {image} under QEMU ({firmware}, {accel}), timeout {timeout}s")
            result = watch_vm(
                argv, console, report, nonce, timeout, scratch,
                kvm=accel == "kvm", firmware_log=firmware_log,
                tcg_race=accel == "tcg" and vcpus > 1,
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
            return test_result(image, result, nonce, scratch, started, accel, firmware, timeout)


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
    passed = result == "done" and parse_report(report, nonce) == "PASS"
    reasons = {
        "done": "all checks passed in the guest" if passed else "checks failed in the guest",
        "timeout": f"no result from the guest within {timeout}s",
        "exited": "QEMU exited before the guest reported",
        "check-unit-failed": "the check runner could not start in the guest (see console)",
    }
    test = TestResult(
        image=image,
        passed=passed,
        reason=reasons.get(result, result),
        checks=parse_checks(report, nonce),
        console_tail=read_text(scratch / "console.log").splitlines()[-30:],
        duration=time.monotonic() - started,
        accel=accel,
        firmware=firmware,
    )
    if result == "exited":
        test.details += read_text(scratch / "qemu.err").splitlines()[-10:]
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
) -> str:
    """Run QEMU until the guest reports, QEMU exits, or the timeout.

    Under `kvm`, QEMU's KVM errors end the boot as "kvm-failed", and with a
    `firmware_log` (SeaBIOS), so does a BIOS that has not started booting
    the disk within SEABIOS_KVM_GRACE seconds. With `tcg_race` (TCG with
    more than one vCPU), a guest oops from TCG's code-patching race ends
    the boot at once as "tcg-race", for the caller to boot again with one.
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
                    return "done"
                text = read_text(console)
                if UNIT_FAILED in text:
                    return "check-unit-failed"
                if tcg_race and TCG_CODE_PATCH_RACE in text:
                    return "tcg-race"
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
        "checks": [{"name": c.name, "passed": c.passed, "output": c.output} for c in result.checks],
    }
    target.write_text(json.dumps(data, indent=2) + "\n")
