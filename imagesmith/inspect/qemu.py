"""Boot images in QEMU: firmware, accelerator, the QEMU command line, the
VM's scratch files, and `imagesmith boot`. `imagesmith test` is vmtest.py.

Firmware: UEFI is OVMF in pflash; BIOS is QEMU's own SeaBIOS (no pflash).
`uefi-secureboot` is OVMF built with Secure Boot and a copy of variables
with Microsoft's keys enrolled (OVMF_VARS_4M.ms.fd), so Secure Boot is
enforced from the first boot; it needs SMM on q35 and a secure pflash, or
OVMF hangs. The default is what the manifest beside the image
(IMAGE.manifest.json) records, the first of its firmware for a hybrid
image, else UEFI; `uefi-secureboot` for UEFI when it was built with
secure_boot on. A
`.raw.zst` image is decompressed into the scratch directory first.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagesmith import log
from imagesmith.config.settings import FIRMWARES
from imagesmith.errors import ConfigError
from imagesmith.formats import manifest_for
from imagesmith.host.leftovers import remove_dead_owners
from imagesmith.host.run import format_command, require_tools, run

FIRMWARE_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)
SECURE_BOOT_FIRMWARE_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    ("/usr/share/OVMF/OVMF_CODE.secboot.fd", "/usr/share/OVMF/OVMF_VARS.ms.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd", "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd"),
)
# What `imagesmith test` and `boot` can boot under: the image's firmware,
# and UEFI with Secure Boot enforced.
QEMU_FIRMWARES = ("uefi", "uefi-secureboot", "bios")
VM_SCRATCH_RE = re.compile(r"^imagesmith-vm-pid(\d+)-[a-z0-9_]+$")
# QEMU's words when KVM cannot run this guest here: it pauses the guest on an
# internal error, or aborts at start (an MSR the host refuses, or, for Secure
# Boot's firmware, a software KVM such as kvm_pvm without SMM).
KVM_FAILURE = re.compile(
    r"KVM internal error|emulation failure|failed to initialize kvm|failed to set MSR|kvm\.c:\d+"
    r"|System Management Mode not supported",
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


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when imagesmith dies, however it
    dies, so no QEMU outlives the test that started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def find_firmware(*, secure_boot: bool = False) -> tuple[Path, Path]:
    pairs = SECURE_BOOT_FIRMWARE_PAIRS if secure_boot else FIRMWARE_PAIRS
    for code, variables in pairs:
        if os.path.exists(code) and os.path.exists(variables):
            return Path(code), Path(variables)
    raise ConfigError(
        f"no UEFI firmware (OVMF{' with Secure Boot' if secure_boot else ''}) found",
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


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def disk_format(image: Path) -> str:
    with image.open("rb") as f:
        magic = f.read(4)
    return {b"QFI\xfb": "qcow2", ZSTD_MAGIC: "zstd"}.get(magic, "raw")


def built_firmware(image: Path) -> tuple[str, ...]:
    """The firmware the image was built for, from its manifest; () when unknown.

    An image built with secure_boot on boots under `uefi-secureboot` first,
    then under plain `uefi` (shim runs without Secure Boot too).
    """
    try:
        manifest = json.loads(manifest_for(image).read_text())
    except (OSError, ValueError):
        return ()
    firmware = manifest.get("firmware", [])
    if not isinstance(firmware, list):
        return ()
    settings = manifest.get("settings")
    secure = isinstance(settings, dict) and settings.get("secure_boot", "off") != "off"
    built: list[str] = []
    for name in firmware:
        if name in FIRMWARES:
            built += ["uefi-secureboot", name] if secure and name == "uefi" else [name]
    return tuple(built)


def firmware_base(firmware: str) -> str:
    """The image firmware a QEMU firmware boots: uefi-secureboot is UEFI."""
    return "uefi" if firmware == "uefi-secureboot" else firmware


def pick_firmware(image: Path, requested: str | None) -> str:
    """--firmware if given (and the image was built for it), else the manifest's first.

    Any UEFI image may boot under `uefi-secureboot`: an image without a
    signed chain is then refused, which is how a refusal is shown.
    """
    built = built_firmware(image)
    if requested is None:
        return built[0] if built else "uefi"
    if requested not in QEMU_FIRMWARES:
        raise ConfigError(f"--firmware {requested!r}: expected one of {', '.join(QEMU_FIRMWARES)}")
    if built and firmware_base(requested) not in built:
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
    display: str = "",
    qmp: Path | None = None,
    secure_boot: bool = False,
) -> list[str]:
    """Without firmware_code, QEMU boots its default PC BIOS (SeaBIOS).

    `firmware_log` captures SeaBIOS's debug port (0x402), our signal that
    the BIOS got as far as booting the disk. `secure_boot` gives OVMF's
    Secure Boot build what it needs: SMM, a pflash only SMM may write, and
    no S3 (OVMF refuses S3 with SMM).
    """
    nic = "user,model=virtio-net-pci" + "".join(
        f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in (forwards or {}).items()
    )
    argv = [
        "qemu-system-x86_64",
        "-machine", f"q35,{'smm=on,' if secure_boot else ''}accel={accel}",
        "-cpu", "host" if accel == "kvm" else TCG_CPU_WITH_SCREEN if display else "max",
        "-smp", str(vcpus), "-m", str(memory),
    ]  # fmt: skip
    if secure_boot:
        argv += [
            "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-global", "ICH9-LPC.disable_s3=1",
        ]  # fmt: skip
    if firmware_code is not None and firmware_vars is not None:
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,file={firmware_code},readonly=on",
            "-drive", f"if=pflash,format=raw,unit=1,file={firmware_vars}",
        ]  # fmt: skip
    argv += [
        "-drive", f"file={disk},format={disk_fmt},if=virtio",
        "-nic", nic,
        *display_argv(display),
    ]  # fmt: skip
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
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


# A guest with a screen draws it with Mesa's llvmpipe, which JIT-compiles
# code for the CPU's vector units. Under TCG with `-cpu max` (AVX and AVX2
# emulated since QEMU 7.2), the desktop example's greeter segfaulted; without
# them (and with Plasma's breeze theme) it draws. Which of the two changes
# mattered is not isolated: a screen under TCG gets no AVX, to be safe.
TCG_CPU_WITH_SCREEN = "max,avx=off,avx2=off,avx512f=off"


def display_argv(display: str) -> list[str]:
    """ "": no display at all; "screen": a standard VGA nobody watches (for
    screendumps); "vnc:N": VNC display N on 127.0.0.1; "window": QEMU's window."""
    if not display:
        return ["-display", "none", "-vga", "none"]
    if display == "screen":
        return ["-display", "none", "-vga", "std"]
    if display.startswith("vnc:"):
        return ["-display", f"vnc=127.0.0.1:{display.removeprefix('vnc:')}", "-vga", "std"]
    return ["-vga", "std"]


@dataclass
class VmFiles:
    scratch: Path
    disk: Path
    disk_fmt: str
    firmware_code: Path | None  # None: SeaBIOS
    firmware_vars: Path | None


# shim's own GUID, the owner of the certificates in its MOK list.
SHIM_LOCK_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"


def virt_fw_vars(flag: str = "mok") -> str:
    """virt-fw-vars (PyPI virt-firmware) on PATH or beside this Python."""
    found = shutil.which("virt-fw-vars") or shutil.which(
        "virt-fw-vars", path=os.path.dirname(sys.executable)
    )
    if found is None:
        raise ConfigError(
            f"--{flag} needs virt-fw-vars, which is not installed",
            hint="pip install virt-firmware (make setup does), or apt install "
            "python3-virt-firmware on Debian 13",
        )
    return found


# The owner GUID imagesmith gives the certificates it adds to db.
IMAGESMITH_GUID = "2d6e4a1c-5f0b-4a8e-9c3d-7b1f0e8a6c42"
ENROL_FLAGS = {"mok": ("--add-mok", SHIM_LOCK_GUID), "db": ("--add-db", IMAGESMITH_GUID)}


@dataclass(frozen=True)
class Enrolment:
    """A certificate to trust in the VM: `mok` (shim's MOK list) or `db` (the firmware's)."""

    where: str
    cert: Path


def enrol(variables: Path, enrolment: Enrolment) -> None:
    """Add the certificate to the MOK list or to db in the variables file, in place."""
    flag, owner = ENROL_FLAGS[enrolment.where]
    if not enrolment.cert.is_file():
        raise ConfigError(f"--{enrolment.where} {enrolment.cert}: no such certificate file")
    enrolled = variables.with_name(f"vars-{enrolment.where}.fd")
    run(
        [
            virt_fw_vars(enrolment.where), "--input", os.fspath(variables),
            "--output", os.fspath(enrolled), flag, owner, os.fspath(enrolment.cert),
        ],
        capture=True, what=f"virt-fw-vars {flag}",
    )  # fmt: skip
    os.replace(enrolled, variables)


@contextlib.contextmanager
def vm_scratch(
    image: Path, *, in_place: bool, firmware: str, enrolments: Sequence[Enrolment] = ()
) -> Iterator[VmFiles]:
    """A scratch dir with a copy of the firmware variables and the disk to boot."""
    if not image.is_file():
        raise ConfigError(f"{image}: no such image file")
    if enrolments and firmware != "uefi-secureboot":
        raise ConfigError(
            f"--{enrolments[0].where} needs Secure Boot firmware, not {firmware}",
            hint="add --firmware uefi-secureboot",
        )
    code, variables = (
        find_firmware(secure_boot=firmware == "uefi-secureboot")
        if firmware_base(firmware) == "uefi"
        else (None, None)
    )
    fmt = disk_format(image)
    if fmt == "zstd" and in_place:
        raise ConfigError(
            f"{image}: a compressed image cannot be booted in place",
            hint="decompress it with `zstd -d` first, or drop --in-place",
        )
    # Named with our PID: what a killed `imagesmith test` left is swept here.
    remove_dead_owners(Path(tempfile.gettempdir()), VM_SCRATCH_RE)
    with tempfile.TemporaryDirectory(prefix=f"imagesmith-vm-pid{os.getpid()}-") as tmp:
        scratch = Path(tmp)
        vars_copy = None
        if variables is not None:
            vars_copy = scratch / "vars.fd"
            shutil.copyfile(variables, vars_copy)
            for enrolment in enrolments:
                enrol(vars_copy, enrolment)
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
    display: str = "",
    enrolments: Sequence[Enrolment] = (),
) -> int:
    require_tools("qemu-system-x86_64", "qemu-img")
    firmware = pick_firmware(image, firmware)
    accel = pick_accel(firmware)
    while True:
        with vm_scratch(
            image, in_place=not snapshot, firmware=firmware, enrolments=enrolments
        ) as vm:
            argv = qemu_argv(
                disk=vm.disk, disk_fmt=vm.disk_fmt, firmware_code=vm.firmware_code,
                firmware_vars=vm.firmware_vars, accel=accel, memory=memory,
                serial=["mon:stdio"], forwards={ssh_port: 22} if ssh_port else None,
                display=display,
                secure_boot=firmware == "uefi-secureboot",
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
