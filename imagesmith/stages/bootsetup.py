"""Stage: boot setup for UEFI and/or a PC BIOS, with the image's own GRUB.

Needs: `ctx.tree` customised, `ctx.layout`. Disk images only: a container
image has no kernel and no bootloader, and this stage returns at once.
Produces:

- /etc/fstab naming every partition by PARTUUID;
- /boot/grub/grub.cfg with the kernel command line (root=PARTUUID=...,
  the first-boot words of tree/firstboot.py, `console=` for the serial console)
  and GRUB on serial and screen, one file for both firmwares;
- for UEFI: GRUB's modules in /boot/grub/x86_64-efi and
  `ctx.esp_tree`/EFI/BOOT/BOOTX64.EFI, made by grub-mkimage from the image's
  own GRUB, at the removable-media path so no NVRAM entry is needed;
- for a BIOS: GRUB's modules in /boot/grub/i386-pc and `ctx.bios_dir`
  holding boot.img and core.img (grub-mkimage -O i386-pc), which the
  assemble stage writes into the MBR and the BIOS boot partition (see
  disk/biosboot.py);
- the initramfs, built once, now that every package and hook is in place,
  or taken from the cache when nothing it holds changed (tree/initramfs.py).

With `secure_boot = "distribution"` the UEFI path is the distribution's
signed chain instead (install_signed_chain): shim as BOOTX64.EFI, the signed
GRUB as grubx64.efi and MokManager (mmx64.efi) beside it, and
EFI/debian/grub.cfg, where Debian's signed GRUB looks (its prefix is
/EFI/debian on the disk it was loaded from). That file finds the root
partition on the disk GRUB came from, as the prefix below does, and reads
the same /boot/grub/grub.cfg. shim's fallback (fbx64.efi) is left out: at
the removable path it would write NVRAM entries and reboot.

With `secure_boot = "own"` (install_own_chain), shim and MokManager stay,
and grubx64.efi is the image's own GRUB, as below, with the signed GRUB's
SBAT data; it and the kernel are signed on the host with sbsign and the key
set in `secure_boot_keys` (host/signing.py), trusted as a MOK.

With `uki = true` (install_uki), the UEFI path is no GRUB at all: once the
initramfs is there, the image's own `ukify` puts the kernel, the initramfs
and the same command line into one EFI binary, EFI/BOOT/BOOTX64.EFI, signed
with the key set under `secure_boot = "own"` and trusted by the firmware's
db, with no shim.

Both unsigned GRUB images get the prefix `(,gptN)/boot/grub`, N the root partition:
it names the root partition on whatever disk the firmware booted from. No
UUID search (filesystem UUIDs may change on first boot), no disk order
assumption. /boot is a directory of the root filesystem, ext4 or btrfs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from imagesmith import log
from imagesmith.config.layout import DiskLayout
from imagesmith.config.settings import format_size
from imagesmith.context import BuildContext
from imagesmith.errors import BuildError
from imagesmith.host.paths import (
    listdir_in_root,
    lstat_in_root,
    makedirs_in_root,
    read_in_root,
    write_in_root,
)
from imagesmith.host.sandbox import run_in_root
from imagesmith.host.signing import sign_pe, signing_key
from imagesmith.inspect.secureboot import pe_section
from imagesmith.stages import sharing
from imagesmith.tree.firstboot import first_boot_cmdline
from imagesmith.tree.initramfs import build_initramfs

GRUB_EFI_MODULES = (
    "part_gpt", "part_msdos", "fat", "ext2", "btrfs", "normal", "linux", "configfile",
    "search", "search_fs_uuid", "search_label", "serial", "terminal",
    "echo", "test", "ls", "cat", "gzio", "zstd", "all_video", "efi_gop", "reboot", "halt",
)  # fmt: skip
GRUB_EFI_DIR = "usr/lib/grub/x86_64-efi"
# core.img loads below 0x78000, so it holds what is needed to reach the root
# filesystem and read grub.cfg; the rest loads from /boot/grub/i386-pc.
GRUB_BIOS_MODULES = (
    "biosdisk", "part_gpt", "part_msdos", "ext2", "btrfs", "normal", "linux", "configfile",
    "serial", "terminal", "echo", "test", "gzio", "zstd",
)  # fmt: skip
GRUB_BIOS_DIR = "usr/lib/grub/i386-pc"


def find_kernel_version(ctx: BuildContext) -> str:
    versions = sorted(
        (
            name.removeprefix("vmlinuz-")
            for name in listdir_in_root(ctx.tree, "boot")
            if name.startswith("vmlinuz-")
        ),
        key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)],
    )
    if not versions:
        raise BuildError(
            "no kernel in /boot of the image",
            hint="a disk image needs a kernel: keep the built-in `base` class in the class list",
        )
    return versions[-1]


def fstab_text(layout: DiskLayout) -> str:
    root, esp = layout.root, layout.partition("esp")
    root_options, root_pass = (
        ("defaults", 0) if root.filesystem == "btrfs" else ("defaults,errors=remount-ro", 1)
    )
    text = (
        "# <file system>  <mount point>  <type>  <options>  <dump>  <pass>\n"
        "# Written by imagesmith. Partitions are named by PARTUUID.\n"
        f"PARTUUID={root.uuid}  /  {root.filesystem}  {root_options}  0  {root_pass}\n"
    )
    if esp is not None:
        text += f"PARTUUID={esp.uuid}  /boot/efi  vfat  umask=0077  0  0\n"
    return text


def grub_prefix(layout: DiskLayout) -> str:
    """The root partition's /boot/grub on the disk GRUB was loaded from."""
    return f"(,gpt{layout.root.number})/boot/grub"


DEFAULT_SERIAL_SPEED = 115200


def serial_port(serial_console: str) -> tuple[int, int]:
    """'ttyS1,57600' -> (1, 57600); the speed defaults to 115200."""
    port, _, speed = serial_console.partition(",")
    return int(port.removeprefix("ttyS")), int(speed or DEFAULT_SERIAL_SPEED)


def kernel_cmdline(ctx: BuildContext) -> str:
    s = ctx.image.settings
    words = [f"root=PARTUUID={ctx.layout.root.uuid}", "ro", *first_boot_cmdline(s, ctx.layout)]
    if s.serial_console:
        unit, speed = serial_port(s.serial_console)
        # The last console= is /dev/console: systemd's status goes to serial.
        words += ["console=tty0", f"console=ttyS{unit},{speed}"]
    return " ".join([*words, *s.kernel_cmdline])


def grub_cfg_text(ctx: BuildContext) -> str:
    s = ctx.image.settings
    lines = ["# Written by imagesmith.", "set timeout=1", "set default=0"]
    if s.serial_console:
        unit, speed = serial_port(s.serial_console)
        lines += [
            f"serial --unit={unit} --speed={speed}",
            "terminal_input serial console",
            "terminal_output serial console",
        ]
    fs_module = "btrfs" if ctx.layout.root.filesystem == "btrfs" else "ext2"
    version = ctx.kernel_version
    lines += [
        "insmod part_gpt",
        f"insmod {fs_module}",
        f"menuentry '{ctx.image.name} (Debian {s.suite}, {version})' {{",
        f"    linux /boot/vmlinuz-{version} {kernel_cmdline(ctx)}",
        f"    initrd /boot/initrd.img-{version}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def copy_grub_modules(ctx: BuildContext, platform: str, *, package: str, klass: str) -> None:
    """/usr/lib/grub/PLATFORM -> /boot/grub/PLATFORM, as grub-install would.
    Copied inside the image root, so the image's own symlinks stay inside it."""
    if lstat_in_root(ctx.tree, f"usr/lib/grub/{platform}") is None:
        raise BuildError(
            f"the image has no /usr/lib/grub/{platform}",
            hint=f"the built-in `{klass}` class installs {package}; add it to the class list",
        )
    script = (
        'set -e; rm -rf "/boot/grub/$1"; mkdir -p "/boot/grub/$1"; '
        'cp -a "/usr/lib/grub/$1/." "/boot/grub/$1/"; '
        'rm -f "/boot/grub/$1"/*.module "/boot/grub/$1"/*.image'
    )
    run_in_root(
        ctx.tree, ["sh", "-c", script, "sh", platform], what=f"copying GRUB's {platform} modules"
    )


def install_grub_efi(ctx: BuildContext, *, name: str = "BOOTX64.EFI", sbat: str = "") -> None:
    """The image's own GRUB as ESP:/EFI/BOOT/NAME; with `sbat`, an .sbat section for shim."""
    copy_grub_modules(ctx, "x86_64-efi", package="grub-efi-amd64-bin", klass="uefi")
    boot_dir = ctx.esp_tree / "EFI/BOOT"
    boot_dir.mkdir(parents=True, exist_ok=True)
    sbat_args, binds = [], [(boot_dir, "/run/imagesmith/esp")]
    if sbat:
        (ctx.workdir / "sbat").mkdir(exist_ok=True)
        (ctx.workdir / "sbat/sbat.csv").write_text(sbat)
        sbat_args = ["--sbat=/run/imagesmith/sbat/sbat.csv"]
        binds.append((ctx.workdir / "sbat", "/run/imagesmith/sbat"))
    run_in_root(
        ctx.tree,
        [
            "grub-mkimage", "--format=x86_64-efi", f"--output=/run/imagesmith/esp/{name}",
            f"--prefix={grub_prefix(ctx.layout)}", *sbat_args, *GRUB_EFI_MODULES,
        ],
        binds=binds,
        what="grub-mkimage",
    )  # fmt: skip


SHIM = "usr/lib/shim/shimx64.efi.signed"
MOK_MANAGER = "usr/lib/shim/mmx64.efi.signed"
SIGNED_GRUB = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
UKI_BIND = "/run/imagesmith/uki"  # where ukify writes, inside the root


def signed_grub_cfg_text(ctx: BuildContext) -> str:
    """EFI/debian/grub.cfg: from the ESP to the root's /boot/grub/grub.cfg.

    The disk comes from $root, which GRUB sets to the ESP it was loaded
    from, "hd0,gpt2" ($cmdpath is empty when shim starts it: seen under
    OVMF); the partition number is the layout's, so no UUID is needed:
    new_fs_uuid changes the root filesystem's on first boot. The fs UUID
    search is a fallback only for a GRUB without `regexp`.
    """
    root = ctx.layout.root
    return (
        "# Written by imagesmith. Debian's signed GRUB reads this file; it reads\n"
        "# the image's own /boot/grub/grub.cfg on the root partition of its disk.\n"
        "if regexp --set=1:imagesmith_disk '^([^,]+)' \"$root\"; then\n"
        f'    set root="($imagesmith_disk,gpt{root.number})"\n'
        "else\n"
        '    echo "imagesmith: no regexp in this GRUB; finding the root by its UUID"\n'
        f"    search --no-floppy --fs-uuid --set=root {root.fs_uuid}\n"
        "fi\n"
        'set prefix="($root)/boot/grub"\n'
        'configfile "$prefix/grub.cfg"\n'
    )


def install_signed_chain(ctx: BuildContext) -> None:
    """shim, the signed GRUB and MokManager at the removable path; GRUB's config."""
    copy_signed_binaries(
        ctx, {"BOOTX64.EFI": SHIM, "grubx64.efi": SIGNED_GRUB, "mmx64.efi": MOK_MANAGER}
    )
    vendor_dir = ctx.esp_tree / "EFI/debian"
    vendor_dir.mkdir(parents=True, exist_ok=True)
    (vendor_dir / "grub.cfg").write_text(signed_grub_cfg_text(ctx))


def install_own_chain(ctx: BuildContext) -> None:
    """shim and MokManager, then the image's own GRUB and kernel signed with our key.

    GRUB gets the signed GRUB's SBAT data (same source package), without
    which shim refuses it. The key stays on the host (or in its token); its
    contents, or the token's PIN, join the secrets the hygiene scan must not
    find in the image.
    """
    copy_signed_binaries(ctx, {"BOOTX64.EFI": SHIM, "mmx64.efi": MOK_MANAGER, "": SIGNED_GRUB})
    sbat = pe_section((ctx.tree / SIGNED_GRUB).read_bytes(), ".sbat").rstrip(b"\0").decode()
    install_grub_efi(ctx, name="grubx64.efi", sbat=sbat)
    sign_with_own_key(
        ctx, ctx.esp_tree / "EFI/BOOT/grubx64.efi", ctx.tree / f"boot/vmlinuz-{ctx.kernel_version}"
    )


def sign_with_own_key(ctx: BuildContext, *paths: Path) -> None:
    """Sign each file with the key set of `secure_boot_keys`; what must never
    reach the image (the key, or the token's PIN) joins the build's secrets."""
    key = signing_key(Path(ctx.image.settings.secure_boot_keys))
    for path in paths:
        sign_pe(path, key=key)
    ctx.secrets += key.secrets()


def copy_signed_binaries(ctx: BuildContext, sources: dict[str, str]) -> None:
    """The distribution's signed binaries onto the ESP (a name "" only checks it is there)."""
    boot_dir = ctx.esp_tree / "EFI/BOOT"
    boot_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not (ctx.tree / source).is_file():
            raise BuildError(
                f"the image has no /{source} for Secure Boot",
                hint="the built-in `secure-boot` class installs shim-signed and "
                'grub-efi-amd64-signed; it is applied while secure_boot is not "off"',
            )
        if name:
            shutil.copyfile(ctx.tree / source, boot_dir / name)


def install_grub_bios(ctx: BuildContext) -> None:
    """boot.img and core.img into `ctx.bios_dir`, for the assemble stage to place."""
    copy_grub_modules(ctx, "i386-pc", package="grub-pc-bin", klass="bios")
    ctx.bios_dir.mkdir(parents=True, exist_ok=True)
    boot_img = read_in_root(ctx.tree, f"{GRUB_BIOS_DIR}/boot.img")
    if boot_img is None:
        raise BuildError(f"the image has no /{GRUB_BIOS_DIR}/boot.img", hint="add the `bios` class")
    (ctx.bios_dir / "boot.img").write_bytes(boot_img)
    run_in_root(
        ctx.tree,
        [
            "grub-mkimage", "--format=i386-pc", "--output=/run/imagesmith/bios/core.img",
            f"--prefix={grub_prefix(ctx.layout)}", *GRUB_BIOS_MODULES,
        ],
        binds=[(ctx.bios_dir, "/run/imagesmith/bios")],
        what="grub-mkimage (i386-pc)",
    )  # fmt: skip


def configure_boot(ctx: BuildContext) -> None:
    if ctx.image.target != "disk":
        return
    firmware = ctx.image.settings.boot_firmware
    ctx.kernel_version = find_kernel_version(ctx)
    write_in_root(ctx.tree, "etc/fstab", fstab_text(ctx.layout))
    write_in_root(ctx.tree, "boot/grub/grub.cfg", grub_cfg_text(ctx))
    if "uefi" in firmware:
        makedirs_in_root(ctx.tree, "boot/efi")
        if ctx.image.settings.uki:
            pass  # made from the initramfs, below
        elif ctx.image.settings.secure_boot == "distribution":
            install_signed_chain(ctx)
        elif ctx.image.settings.secure_boot == "own":
            install_own_chain(ctx)
        else:
            install_grub_efi(ctx)
    if "bios" in firmware:
        install_grub_bios(ctx)
    remote = sharing.InitramfsSharing(ctx) if ctx.remote_cache else None
    ctx.initramfs_cache = build_initramfs(ctx.tree, ctx.kernel_version, ctx.cache_dir, remote)
    if "uefi" in firmware and ctx.image.settings.uki:
        install_uki(ctx)


def install_uki(ctx: BuildContext) -> None:
    """The unified kernel image as EFI/BOOT/BOOTX64.EFI, signed with the key
    set for secure_boot = "own". The image's own ukify makes it in a folder
    of the workdir bound into the root; only a regular file is taken from
    there, never followed through a link."""
    out = ctx.workdir / "uki"
    out.mkdir()
    version = ctx.kernel_version
    run_in_root(
        ctx.tree,
        [
            "ukify", "build", f"--linux=/boot/vmlinuz-{version}",
            f"--initrd=/boot/initrd.img-{version}", f"--cmdline={kernel_cmdline(ctx)}",
            f"--uname={version}", f"--output={UKI_BIND}/uki.efi",
        ],
        binds=[(out, UKI_BIND)],
        what="ukify (the unified kernel image)",
    )  # fmt: skip
    made = read_in_root(out, "uki.efi")  # a regular file, never a link out of `out`
    shutil.rmtree(out)
    if made is None:
        raise BuildError("ukify made no unified kernel image (no regular file uki.efi)")
    target = ctx.esp_tree / "EFI/BOOT/BOOTX64.EFI"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(made)
    if ctx.image.settings.secure_boot == "own":
        sign_with_own_key(ctx, target)
    log.info(f"    unified kernel image: {format_size(target.stat().st_size)}")
