"""Load a config space into frozen, validated data.

A config space is a directory with:

- `imagesmith.toml`: `[defaults]` settings for every image, and one
  `[images.NAME]` table per image with its ordered `classes` list and settings;
- `classes/NAME/`: one folder per class (see `config/classes.py`).

Everything is checked here, before any slow work: unknown keys, wrong types,
unknown classes, sizes that cannot hold the partitions. Errors name the file,
the line where we can find it, and the key.

An image's target follows from its outputs: disk formats make a disk image,
container formats a container image. Classes that do not apply to the target
(the built-in boot classes, for a container) are left out of the merge and
listed as skipped.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesmith.config.classes import (
    ClassDef,
    MergedClasses,
    add_switched_classes,
    find_class,
    merge_classes,
)
from imagesmith.config.interfaces import Interface
from imagesmith.config.interfaces import implied_packages as network_packages
from imagesmith.config.layout import check_layout_fits
from imagesmith.config.packages import package_name
from imagesmith.config.repositories import (
    Repository,
    check_one_tls_identity_per_host,
    repository_from,
)
from imagesmith.config.settings import (
    CONTAINER_OUTPUTS,
    DISK_OUTPUTS,
    SETTINGS_BY_NAME,
    ImageSettings,
    check_setting,
    class_switches,
    merge_settings,
    switched_classes,
)
from imagesmith.config.tomlfile import check_keys, load_toml, locate
from imagesmith.config.users import User
from imagesmith.config.users import implied_packages as account_packages
from imagesmith.errors import ConfigError

CONFIG_FILE = "imagesmith.toml"
TOP_LEVEL_KEYS = {"defaults", "images", "default_image"}
IMAGE_KEYS = {"classes", "description"}
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


@dataclass(frozen=True)
class ResolvedImage:
    """One image with its classes merged: what the build pipeline consumes."""

    name: str
    description: str
    config_space: Path
    classes: tuple[ClassDef, ...]
    settings: ImageSettings
    packages: tuple[str, ...]
    remove_packages: tuple[str, ...]
    repositories: tuple[Repository, ...]
    debconf: str
    waivers: dict[str, tuple[str, str]]  # hygiene finding -> (reason, class)
    users: tuple[User, ...]
    interfaces: tuple[Interface, ...]
    # Classes of the image's list that do not apply to its target.
    skipped_classes: tuple[ClassDef, ...] = ()
    # Those of `packages` that apt installs with their Recommends.
    recommends: tuple[str, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def target(self) -> str:
        return self.settings.target


@dataclass(frozen=True)
class ConfigSpace:
    path: Path
    defaults: dict[str, Any]
    images: dict[str, dict[str, Any]]
    default_image: str

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE


def load_config_space(path: Path) -> ConfigSpace:
    path = path.resolve()
    config_file = path / CONFIG_FILE
    if not path.is_dir():
        raise ConfigError(f"{path}: config space directory not found")
    if not config_file.is_file():
        raise ConfigError(
            f"{config_file}: not found",
            hint=f"a config space needs a {CONFIG_FILE}; see docs/config-reference.md",
        )
    data = load_toml(config_file)
    check_keys(data, TOP_LEVEL_KEYS, lambda key: locate(config_file, key), label="top-level key")
    defaults = _check_settings_table(data.get("defaults", {}), config_file, "defaults")
    images = data.get("images", {})
    if not isinstance(images, dict) or not images:
        raise ConfigError(
            f"{config_file}: no images defined",
            hint="add an [images.NAME] table with a `classes` list",
        )
    checked: dict[str, dict[str, Any]] = {}
    for name, table in images.items():
        section = f"images.{name}"
        if not IMAGE_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{locate(config_file, '', section=section)}: {name!r} is not a valid image name",
                hint="it names the output files: letters, digits, '.', '_', '+' and '-', "
                "starting with a letter or digit, at most 64",
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{locate(config_file, name)}: [{section}] must be a table")
        checked[name] = _check_image_table(table, config_file, section)
    default_image = data.get("default_image", next(iter(images)))
    if not isinstance(default_image, str):
        raise ConfigError(
            f"{locate(config_file, 'default_image')}: default_image must be an image name string"
        )
    if default_image not in images:
        raise ConfigError(
            f"{locate(config_file, 'default_image')}: default_image "
            f"{default_image!r} is not a defined image",
            hint=f"defined images: {', '.join(images)}",
        )
    return ConfigSpace(path, defaults, checked, default_image)


def _check_settings_table(table: object, file: Path, section: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{locate(file, '', section=section)}: [{section}] must be a table")
    return {
        key: check_setting(
            key, value, where=f"{locate(file, key, section=section)}: [{section}] {key}"
        )
        for key, value in table.items()
    }


def _check_image_table(table: dict[str, Any], file: Path, section: str) -> dict[str, Any]:
    classes = table.get("classes")
    where = f"{locate(file, 'classes', section=section)}: [{section}] classes"
    if classes is None:
        raise ConfigError(f"{locate(file, '', section=section)}: [{section}] has no `classes` list")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{where}: expected a list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{where}: a class is listed twice")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{locate(file, 'description', section=section)}: expected a string")
    settings = _check_settings_table(
        {k: v for k, v in table.items() if k not in IMAGE_KEYS}, file, section
    )
    return {"classes": classes, "description": description, "settings": settings}


def check_switched_classes(
    listed: list[str], names: list[str], settings: ImageSettings, *, where: str
) -> None:
    """A class a switch applies is listed only while its switch is on."""
    on = {c for _, c in switched_classes(settings)}
    for class_name, setting in class_switches().items():
        off, turn_on = switch_words(setting)
        if class_name in listed and class_name not in on:
            raise ConfigError(
                f"{where}: class {class_name!r} is listed but {setting} = {off}",
                hint=f"drop {class_name!r} from the class list, or set {setting} = {turn_on}",
            )
        if class_name in names and class_name not in on:
            raise ConfigError(
                f"{where}: a class turned {setting} off after {setting} = {turn_on} added "
                f"class {class_name!r}",
                hint=f"set {setting} = {off} in imagesmith.toml instead",
            )


def switch_words(setting: str) -> tuple[str, str]:
    """How a switch is written off and on in TOML: false/true, or "off"/a choice."""
    row = SETTINGS_BY_NAME[setting]
    if row.kind == "bool":
        return "false", "true"
    return '"off"', " or ".join(f'"{c}"' for c in row.choices if c != "off")


def check_secure_boot(settings: ImageSettings, config_space: Path, *, where: str) -> None:
    """Secure Boot is a UEFI matter; own keys must be there, outside the config space."""
    if settings.secure_boot != "off" and "uefi" not in settings.boot_firmware:
        raise ConfigError(
            f'{where}: secure_boot = "{settings.secure_boot}" but the image boots under '
            f"{' and '.join(settings.boot_firmware)} only",
            hint='add the built-in `uefi` class (with `bios` too for a hybrid image), or set secure_boot = "off"',
        )
    if settings.uki and "uefi" not in settings.boot_firmware:
        raise ConfigError(
            f"{where}: uki = true but the image boots under "
            f"{' and '.join(settings.boot_firmware)} only",
            hint="add the built-in `uefi` class, or drop uki",
        )
    if settings.uki and settings.secure_boot == "distribution":
        raise ConfigError(
            f'{where}: uki = true with secure_boot = "distribution"',
            hint="the distribution signs shim and GRUB, not a UKI: set secure_boot = "
            '"own" with your key set, or drop uki',
        )
    if settings.secure_boot != "own":
        return
    keys = Path(settings.secure_boot_keys)
    if not settings.secure_boot_keys:
        raise ConfigError(
            f'{where}: secure_boot = "own" needs secure_boot_keys',
            hint="make a key set with `imagesmith keys DIR` and set secure_boot_keys = DIR",
        )
    if keys.resolve().is_relative_to(config_space.resolve()):
        raise ConfigError(
            f"{where}: secure_boot_keys {keys} is inside the config space",
            hint="private keys must live outside the config space",
        )
    private = "db.pkcs11" if (keys / "db.pkcs11").is_file() else "db.key"
    for name in (private, "db.crt"):
        if not (keys / name).is_file():
            raise ConfigError(
                f"{where}: secure_boot_keys: no {keys / name}",
                hint=f"make a key set with `imagesmith keys {keys}`",
            )


def resolve_image(
    space: ConfigSpace, name: str, *, overrides: dict[str, Any] | None = None
) -> ResolvedImage:
    """Resolve one image: find its classes, merge them, validate the result."""
    if name not in space.images:
        raise ConfigError(
            f"{space.config_file}: no image named {name!r}",
            hint=f"defined images: {', '.join(space.images)}",
        )
    table = space.images[name]
    where = f"{locate(space.config_file, 'classes', section=f'images.{name}')}"
    checked_overrides = {
        key: check_setting(key, value, where=f"command line: {key}")
        for key, value in (overrides or {}).items()
    }
    found: dict[str, ClassDef] = {}

    def merged_settings(classes: tuple[ClassDef, ...]) -> ImageSettings:
        layers = merge_classes(classes).settings_layers
        return merge_settings([space.defaults, *layers, table["settings"], checked_overrides])

    def resolve(names: list[str]) -> tuple[tuple[ClassDef, ...], ImageSettings]:
        for class_name in names:
            if class_name not in found:
                found[class_name] = find_class(space.path, class_name, where=where)
        classes = tuple(found[n] for n in names)
        return classes, merged_settings(classes)

    listed = list(table["classes"])
    classes, settings = resolve(listed)
    # Switches like grow_root add built-in classes; those classes' own
    # settings are merged in a second pass and must not flip a switch.
    names = add_switched_classes(listed, [c for _, c in switched_classes(settings)])
    if names != listed:
        classes, settings = resolve(names)
    check_switched_classes(listed, names, settings, where=where)
    switches = class_switches()
    classes = tuple(
        dataclasses.replace(c, switched_by=switches[c.name])
        if c.name in switches and c.name not in listed
        else c
        for c in classes
    )
    # The outputs decide the target; only then do we know which classes apply.
    target = check_outputs(settings.outputs, space.config_file, name)
    applied = tuple(c for c in classes if c.applies_to(target))
    merged = merge_classes(applied)
    settings = merged_settings(applied)
    if target == "disk":
        check_secure_boot(settings, space.path, where=f"{space.config_file} [images.{name}]")
        check_layout_fits(settings, where=f"{space.config_file} [images.{name}] size")
    repositories = tuple(
        repository_from(r, default_suite=settings.suite) for r in merged.repositories
    )
    check_one_tls_identity_per_host(repositories)
    if target == "disk" and settings.network == "none" and merged.interfaces:
        declared = ", ".join(i.name for i in merged.interfaces)
        raise ConfigError(
            f'{where}: network = "none" configures no interface, but classes declare '
            f"[[interfaces]] {declared}",
            hint='set network = "networkd" or "networkmanager", or drop the [[interfaces]]',
        )
    return ResolvedImage(
        name=name,
        description=table["description"],
        config_space=space.path,
        classes=applied,
        settings=settings,
        packages=with_implied_packages(merged, settings, target=target),
        remove_packages=merged.remove_packages,
        recommends=merged.recommends,
        repositories=repositories,
        debconf=merged.debconf,
        waivers=merged.waivers,
        users=merged.users,
        interfaces=merged.interfaces,
        skipped_classes=tuple(c for c in classes if not c.applies_to(target)),
    )


def with_implied_packages(
    merged: MergedClasses, settings: ImageSettings, *, target: str = "disk"
) -> tuple[str, ...]:
    """The classes' packages plus what settings need (sudo, the network stack).

    A container image gets no network stack (its runtime does networking), but
    gets `passwd`: the root password and users are set with chpasswd and
    useradd, and the built-in `base` class that brings it is for disks only.
    """
    implied = [
        *(network_packages(settings.network) if target == "disk" else ("passwd",)),
        *account_packages(merged.users),
    ]
    names = {package_name(p) for p in merged.packages}
    return merged.packages + tuple(p for p in implied if p not in names)


def check_outputs(outputs: tuple[str, ...], config_file: Path, name: str) -> str:
    """The image's target from its outputs; both kinds at once is an error."""
    where = f"{locate(config_file, 'outputs', section=f'images.{name}')}: [images.{name}] outputs"
    if not outputs:
        raise ConfigError(f"{where}: no outputs", hint='for example outputs = ["raw"]')
    disk = [o for o in outputs if o in DISK_OUTPUTS]
    container = [o for o in outputs if o in CONTAINER_OUTPUTS]
    if disk and container:
        raise ConfigError(
            f"{where}: {', '.join(disk)} make a disk image and {', '.join(container)} "
            "a container image; one image is one or the other",
            hint="define two images with the same classes, one for each",
        )
    return "container" if container else "disk"
