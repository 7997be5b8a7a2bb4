"""The settings table: every image setting, its type, default and help.

This one table drives the parser (type checks and unknown-key errors), the
merge rules between classes, the command-line overrides and the reference
page in docs/config-reference.md. To add a setting, add a row here and a field
to `ImageSettings`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagesmith.errors import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(value: object, *, where: str) -> int:
    """'2GiB', '512M', '1.5G' or a number of bytes. K/M/G/T are powers of 1024."""
    if isinstance(value, bool):
        raise ConfigError(f'{where}: expected a size like "2GiB", got {value!r}')
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        number = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise ConfigError(f'{where}: expected a size like "2GiB" or "512MiB", got {value!r}')
    if number <= 0:
        raise ConfigError(f"{where}: size must be positive, got {value!r}")
    return number


# `size = "auto"`: the disk is sized from the tree at assembly (0 stands for it).
AUTO_SIZE = 0
AUTO_HEADROOM = 512 * MiB


def format_size(number: int) -> str:
    """Human-readable size: '2GiB', '1.53GiB', '300MiB'."""
    for unit, factor in (("TiB", 1024 * GiB), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if number >= factor:
            value = number / factor
            return f"{value:g}{unit}" if value == int(value) else f"{value:.2f}{unit}"
    return f"{number}B"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "str", "size", "choice", "list", "choicelist", "bool"
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    # "replace": a later class replaces the value; "append": lists accumulate.
    merge: str = "replace"
    cli: bool = False  # also settable from `imagesmith build --set`/flags
    pattern: str = ""  # for "str" settings: the value must match this regex
    pattern_help: str = ""
    # For switches: the built-in class that applies while the switch is on
    # (a "bool" that is true, or a "choice" that is not "off").
    applies_class: str = ""


FILESYSTEMS = ("ext4", "btrfs")
DISK_OUTPUTS = ("raw", "raw.zst", "qcow2")
CONTAINER_OUTPUTS = ("oci", "tar")
FIRMWARES = ("uefi", "bios")
TARGETS = ("disk", "container")
SECURE_BOOT_MODES = ("off", "distribution", "own")
# KEY=VALUE, as in container environments and labels.
KEY_VALUE = r"[^=\s]+=.*"

SETTINGS: tuple[Setting, ...] = (
    Setting("suite", "str", "trixie", "Debian suite (codename) to build from."),
    Setting("architecture", "choice", "amd64", "Target architecture.", choices=("amd64",)),
    Setting(
        "mirror",
        "str",
        "",
        "Archive URI for the suite. Empty: taken from the build host's apt sources.",
    ),
    Setting("components", "list", ["main"], "Archive components to use from the mirror."),
    Setting(
        "size",
        "size",
        "2GiB",
        'Size of the disk image (raw images are sparse), or "auto": what the root tree '
        "holds, plus filesystem overhead and 512MiB free; growth on first boot "
        "makes it the size of whatever disk it lands on.",
    ),
    Setting("esp_size", "size", "256MiB", "Size of the EFI system partition."),
    Setting("filesystem", "choice", "ext4", "Root filesystem.", choices=FILESYSTEMS, cli=True),
    Setting(
        "outputs",
        "choicelist",
        ["raw"],
        "Output formats to write beside each other. Disk formats (`raw`, `raw.zst`, "
        "`qcow2`) make a disk image; container formats (`oci`, an OCI image archive, and "
        "`tar`, a plain rootfs tarball) make a container image from the same classes, "
        "without those that only a bootable system needs. An image is one or the other.",
        choices=DISK_OUTPUTS + CONTAINER_OUTPUTS,
    ),
    Setting(
        "firmware",
        "choicelist",
        [],
        "Firmware a disk image boots under: `uefi`, `bios` or both (a hybrid image); "
        "empty means `uefi`. The built-in classes `uefi` and `bios` add theirs. "
        "Accumulates over classes.",
        choices=FIRMWARES,
        merge="append",
    ),
    Setting(
        "kernel_cmdline",
        "list",
        [],
        "Extra kernel command line words. Accumulates over classes.",
        merge="append",
    ),
    Setting(
        "serial_console",
        "str",
        "ttyS0,115200",
        "Serial console ttySN[,SPEED] for GRUB, kernel and getty (speed default 115200). "
        "Empty disables it.",
        pattern=r"(ttyS\d+(,\d+)?)?",
        pattern_help='like "ttyS0,115200", or "" for none',
    ),
    Setting(
        "hostname",
        "str",
        "debian",
        "Host name written to /etc/hostname.",
        pattern=r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
        pattern_help="letters, digits and inner hyphens, at most 63",
    ),
    Setting(
        "network",
        "choice",
        "networkd",
        "Network stack: DHCP on every ethernet interface with systemd-networkd and "
        "systemd-resolved, NetworkManager (desktops), or none.",
        choices=("networkd", "networkmanager", "none"),
    ),
    Setting(
        "root_password_hash",
        "str",
        "",
        "crypt(3) hash for root's password. Empty: root's password is locked.",
        pattern=r"(\$[0-9a-z]+\$\S+)?",
        pattern_help="a hash from `mkpasswd -m yescrypt`, never a plain password",
    ),
    Setting(
        "grow_root",
        "bool",
        True,
        "Grow the root partition to the end of the disk and the root filesystem to the "
        "partition on first boot (systemd-repart, systemd-growfs).",
        applies_class="grow-root",
    ),
    Setting(
        "new_fs_uuid",
        "bool",
        True,
        "Give the root filesystem a new random UUID on first boot, from an initramfs hook "
        "before it is mounted (btrfs; ext4 where it is safe).",
        applies_class="new-fs-uuid",
    ),
    Setting(
        "new_ssh_host_keys",
        "bool",
        True,
        "Ship no SSH host keys; each machine makes its own on first boot, before sshd starts.",
        applies_class="new-ssh-host-keys",
    ),
    Setting(
        "secure_boot",
        "choice",
        "off",
        "UEFI Secure Boot. `distribution`: the distribution's signed chain, Debian's shim "
        "(signed by Microsoft's UEFI CA) as EFI/BOOT/BOOTX64.EFI, Debian's signed GRUB and "
        "the signed kernel (the built-in class `secure-boot`). Needs `uefi` in `firmware`; "
        "the BIOS part of a hybrid image is unchanged. `own`: the distribution's shim, then "
        "GRUB built by imagesmith and the kernel, both signed with the key set in "
        "`secure_boot_keys`, trusted as a MOK. See docs/secure-boot.md.",
        choices=SECURE_BOOT_MODES,
        applies_class="secure-boot",
    ),
    Setting(
        "secure_boot_keys",
        "str",
        "",
        'For secure_boot = "own": the folder holding db.key and db.crt, made by '
        "`imagesmith keys`; an absolute path outside the config space. The private key "
        "signs at build time and never enters the image, the manifest or a cache. With "
        "db.pkcs11 (a PKCS#11 URI) instead of db.key, the key stays in its token and the "
        "PIN comes from $IMAGESMITH_PKCS11_PIN.",
        pattern=r"(/\S*)?",
        pattern_help="an absolute path, or empty",
    ),
    Setting(
        "uki",
        "bool",
        False,
        "Boot UEFI through a unified kernel image: the kernel, the initramfs and the "
        "command line in one EFI binary (made by the image's own systemd-ukify), as "
        "EFI/BOOT/BOOTX64.EFI, with no GRUB on the UEFI path (the built-in class `uki`). "
        'With secure_boot = "own", the key set signs it and the firmware trusts it '
        "directly, its certificate in db, with no shim. A BIOS part keeps GRUB.",
        applies_class="uki",
    ),
    Setting(
        "uuid_seed",
        "str",
        "",
        "Derive the partition and filesystem UUIDs from this text, for reproducible output. "
        "Empty: new random UUIDs for every build.",
    ),
    Setting(
        "container_entrypoint",
        "list",
        [],
        "Container images: the entrypoint (argv), empty for none.",
    ),
    Setting(
        "container_cmd",
        "list",
        ["/bin/bash"],
        "Container images: the default command (argv), or arguments to the entrypoint.",
    ),
    Setting(
        "container_env",
        "list",
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Container images: environment, `KEY=VALUE` each. Accumulates over classes; "
        "a later value for the same KEY wins.",
        merge="append",
        pattern=KEY_VALUE,
        pattern_help='like "LANG=C.UTF-8"',
    ),
    Setting(
        "container_labels",
        "list",
        [],
        "Container images: extra labels, `KEY=VALUE` each, beside the ones imagesmith "
        "sets (image name, classes, build time). Accumulates over classes.",
        merge="append",
        pattern=KEY_VALUE,
        pattern_help='like "org.opencontainers.image.vendor=Example"',
    ),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class ImageSettings:
    suite: str
    architecture: str
    mirror: str
    components: tuple[str, ...]
    size: int
    esp_size: int
    filesystem: str
    outputs: tuple[str, ...]
    firmware: tuple[str, ...]
    kernel_cmdline: tuple[str, ...]
    serial_console: str
    hostname: str
    network: str
    root_password_hash: str
    grow_root: bool
    new_fs_uuid: bool
    new_ssh_host_keys: bool
    secure_boot: str
    secure_boot_keys: str
    uki: bool
    uuid_seed: str
    container_entrypoint: tuple[str, ...]
    container_cmd: tuple[str, ...]
    container_env: tuple[str, ...]
    container_labels: tuple[str, ...]

    @property
    def boot_firmware(self) -> tuple[str, ...]:
        """The firmware a disk image is made for; UEFI unless a class says otherwise."""
        return self.firmware or ("uefi",)

    @property
    def target(self) -> str:
        """ "container" when the outputs are container formats, else "disk"."""
        return "container" if set(self.outputs) & set(CONTAINER_OUTPUTS) else "disk"


def _check_str_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


def check_setting(name: str, value: object, *, where: str) -> Any:
    """Validate one raw TOML value for a setting and return it normalised."""
    setting = SETTINGS_BY_NAME.get(name)
    if setting is None:
        raise ConfigError(
            f"{where}: unknown setting {name!r}",
            hint=f"known settings: {', '.join(sorted(SETTINGS_BY_NAME))}",
        )
    checkers: dict[str, Callable[[], Any]] = {
        "str": lambda: _check_str(setting, value, where),
        "bool": lambda: _expect(isinstance(value, bool), value, "true or false", where),
        "size": lambda: (
            AUTO_SIZE
            if setting.name == "size" and value == "auto"
            else parse_size(value, where=where)
        ),
        "list": lambda: [_check_str(setting, v, where) for v in _check_str_list(value, where)],
        "choice": lambda: _check_choice(setting, value, where),
        "choicelist": lambda: [
            _check_choice(setting, v, where) for v in _check_str_list(value, where)
        ],
    }
    return checkers[setting.kind]()


def _expect(ok: bool, value: object, what: str, where: str) -> object:
    if not ok:
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    return value


def _check_str(setting: Setting, value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if setting.pattern and not re.fullmatch(setting.pattern, value):
        raise ConfigError(f"{where}: {value!r} is not valid", hint=setting.pattern_help)
    return value


def _check_choice(setting: Setting, value: object, where: str) -> str:
    if value not in setting.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(setting.choices)}")
    assert isinstance(value, str)
    return value


def merge_settings(layers: list[dict[str, Any]]) -> ImageSettings:
    """Merge validated setting layers, lowest priority first."""
    values: dict[str, Any] = {}
    for s in SETTINGS:
        default = s.default
        values[s.name] = parse_size(default, where=s.name) if s.kind == "size" else default
    for layer in layers:
        for name, value in layer.items():
            if SETTINGS_BY_NAME[name].merge == "append":
                values[name] = [*values[name], *value]
                if SETTINGS_BY_NAME[name].kind == "choicelist":
                    values[name] = list(dict.fromkeys(values[name]))
            else:
                values[name] = value
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return ImageSettings(**values)


def settings_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ImageSettings)]


def switch_is_on(value: object) -> bool:
    """A bool switch that is true, or a choice switch that is not "off"."""
    return value not in (False, "off", "")


def switched_classes(settings: ImageSettings) -> list[tuple[str, str]]:
    """(setting, class) for every switch that is on, in table order."""
    return [
        (s.name, s.applies_class)
        for s in SETTINGS
        if s.applies_class and switch_is_on(getattr(settings, s.name))
    ]


def class_switches() -> dict[str, str]:
    """Built-in class name -> the setting that switches it on."""
    return {s.applies_class: s.name for s in SETTINGS if s.applies_class}


# Settings whose value a manifest or a summary must not show.
SENSITIVE_SETTINGS = {"root_password_hash"}
REDACTED = "(set; not shown)"


def redacted(name: str, value: Any) -> Any:
    """The value to show for a setting: a password hash only says that it is set."""
    return REDACTED if name in SENSITIVE_SETTINGS and value else value
