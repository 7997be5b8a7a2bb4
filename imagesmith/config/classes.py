"""Classes: discovery, validation and the merge rules.

A class is a folder `classes/NAME/` in the config space, or one of the
built-in classes shipped in `imagesmith/data/classes/`. A config space class
of the same name replaces the built-in one; with `extend = true` in its
class.toml it applies on top of the built-in one instead.

A class folder may hold:

| entry        | what it is                                                      |
| ------------ | --------------------------------------------------------------- |
| class.toml   | packages, repositories and settings (all optional)              |
| files/       | a tree copied into the image; the last class wins per path      |
| fcopy/       | a tree the `fcopy` script helper copies from, last class wins    |
| scripts/     | executables run in name order inside the image root             |
| debconf      | debconf selections (`debconf-set-selections` format)            |
| README, README.md | documentation, ignored by the build                        |

A class applies to every target (disk images and container images) unless its
class.toml says `targets = ["disk"]` or `["container"]`. The built-in boot
classes (`base`, `uefi`, `bios`) are disk-only, so the same class list makes
a container image without kernel, bootloader or firmware.

Merge rules, in class order: package sets merge (a later `remove` takes a
package out of the set, a later `install` puts it back), a later setting
replaces an earlier one (lists marked "append" accumulate), a repository
with the same name replaces the earlier one, debconf selections are applied
in class order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesmith.config.findings import FINDINGS
from imagesmith.config.interfaces import Interface, interfaces_from, merge_interfaces
from imagesmith.config.packages import PACKAGE_RE, package_name
from imagesmith.config.repositories import check_repository
from imagesmith.config.settings import TARGETS, check_setting
from imagesmith.config.tomlfile import check_keys, inside_space, load_toml, locate
from imagesmith.config.users import User, merge_users, users_from
from imagesmith.errors import ConfigError

BUILTIN_CLASSES = Path(__file__).parent.parent / "data" / "classes"
CLASS_FILE = "class.toml"
CLASS_ENTRIES = {CLASS_FILE, "files", "fcopy", "scripts", "debs", "debconf", "README", "README.md"}
CLASS_KEYS = {
    "description", "extend", "targets", "packages", "repositories", "settings", "waivers",
    "users", "interfaces",
}  # fmt: skip
WAIVER_KEYS = {"finding", "reason"}
PACKAGES_KEYS = {"install", "remove", "recommends"}

CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ClassDef:
    name: str
    path: Path
    builtin: bool
    description: str = ""
    extend: bool = False
    targets: tuple[str, ...] = ()  # empty: as the class it extends, else every target
    install: tuple[str, ...] = ()
    # apt installs this class's packages with their Recommends (FAI's
    # `install` against `install-norec`); off by default.
    recommends: bool = False
    remove: tuple[str, ...] = ()
    repositories: tuple[dict[str, Any], ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    debconf: str = ""
    scripts: tuple[Path, ...] = ()
    waivers: tuple[tuple[str, str], ...] = ()  # (finding, reason)
    users: tuple[User, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    debs: tuple[Path, ...] = ()
    extends: ClassDef | None = None
    # The setting (e.g. "grow_root") that added this class to the image, if any.
    switched_by: str = ""

    @property
    def files_dir(self) -> Path | None:
        d = self.path / "files"
        return d if d.is_dir() else None

    @property
    def fcopy_dir(self) -> Path | None:
        d = self.path / "fcopy"
        return d if d.is_dir() else None

    def layers(self) -> tuple[ClassDef, ...]:
        """This class as applied: the built-in it extends first, then itself."""
        return (*self.extends.layers(), self) if self.extends else (self,)

    @property
    def effective_targets(self) -> tuple[str, ...]:
        """The targets this class applies to; a class that extends a built-in
        and says nothing itself applies where the built-in does."""
        if self.targets:
            return self.targets
        return self.extends.effective_targets if self.extends else TARGETS

    def applies_to(self, target: str) -> bool:
        return target in self.effective_targets


def available_classes(space: Path) -> list[str]:
    names: set[str] = set()
    for root in (space / "classes", BUILTIN_CLASSES):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir())
    return sorted(names)


def add_switched_classes(names: list[str], switched: list[str]) -> list[str]:
    """The class list with the classes of the settings switched on added.

    Each one goes right after `base` (or first, without `base`), so every
    class the image lists itself comes later and wins. A class the list
    names already keeps its place.
    """
    missing = [name for name in switched if name not in names]
    at = names.index("base") + 1 if "base" in names else 0
    return [*names[:at], *missing, *names[at:]]


def find_class(space: Path, name: str, *, where: str) -> ClassDef:
    if not CLASS_NAME_RE.match(name):
        raise ConfigError(f"{where}: {name!r} is not a valid class name")
    user = space / "classes" / name
    builtin = BUILTIN_CLASSES / name
    if user.is_dir():
        cls = load_class(user, builtin=False, space=space)
        if not cls.extend:
            return cls
        if not builtin.is_dir():
            raise ConfigError(
                f"{user / CLASS_FILE}: `extend = true` but there is no built-in "
                f"class {name!r} to extend"
            )
        return dataclasses.replace(cls, extends=load_class(builtin, builtin=True))
    if builtin.is_dir():
        return load_class(builtin, builtin=True)
    raise ConfigError(
        f"{where}: unknown class {name!r}",
        hint=f"no folder {user}; known classes: {', '.join(available_classes(space))}",
    )


Locate = Callable[..., str]  # (key, section="") -> "file:line" of the key


def load_class(path: Path, *, builtin: bool, space: Path | None = None) -> ClassDef:
    """Read and validate one class folder of the config space `space` (by
    default the folder above classes/). Nothing it reads may lead out of it."""
    space = BUILTIN_CLASSES if builtin else space or path.parent.parent
    inside_space(space, path, "the class folder")
    _check_class_entries(path)
    class_file = inside_space(space, path / CLASS_FILE, "class.toml")
    data: dict[str, Any] = load_toml(class_file) if class_file.is_file() else {}

    def where(key: str, section: str = "") -> str:
        return locate(class_file, key, section=section)

    check_keys(data, CLASS_KEYS, where, hint=f"allowed keys: {', '.join(sorted(CLASS_KEYS))}")
    description, extend, targets = _check_class_header(data, where)
    install, remove, recommends = _check_package_table(data, where)
    repositories = data.get("repositories", [])
    if not isinstance(repositories, list):
        raise ConfigError(f"{where('repositories')}: use [[repositories]] tables")
    settings_table = data.get("settings", {})
    if not isinstance(settings_table, dict):
        raise ConfigError(f"{where('settings')}: [settings] must be a table")
    waivers = data.get("waivers", [])
    if not isinstance(waivers, list):
        raise ConfigError(f"{where('waivers')}: use [[waivers]] tables")
    debconf_file = inside_space(space, path / "debconf", "debconf")
    return ClassDef(
        name=path.name,
        path=path,
        builtin=builtin,
        description=description,
        extend=extend,
        targets=targets,
        install=install,
        recommends=recommends,
        remove=remove,
        repositories=tuple(
            check_repository(r, f"{class_file} [[repositories]] #{i + 1}", space=space)
            for i, r in enumerate(repositories)
        ),
        settings={
            key: check_setting(key, value, where=f"{where(key, 'settings')}: [settings] {key}")
            for key, value in settings_table.items()
        },
        debconf=debconf_file.read_text() if debconf_file.is_file() else "",
        scripts=tuple(
            inside_space(space, s, "a class script") for s in _find_scripts(path / "scripts")
        ),
        waivers=tuple(
            _check_waiver(w, f"{class_file} [[waivers]] #{i + 1}") for i, w in enumerate(waivers)
        ),
        users=users_from(data.get("users", []), str(class_file)),
        interfaces=interfaces_from(data.get("interfaces", []), str(class_file)),
        debs=tuple(
            inside_space(space, deb, "a local .deb")
            for deb in sorted((path / "debs").glob("*.deb"))
        ),
    )


def _check_class_entries(path: Path) -> None:
    for entry in path.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.name not in CLASS_ENTRIES:
            raise ConfigError(
                f"{entry}: unknown entry in class {path.name!r}",
                hint=f"a class folder may hold: {', '.join(sorted(CLASS_ENTRIES))}",
            )


def _check_class_header(data: dict[str, Any], where: Locate) -> tuple[str, bool, tuple[str, ...]]:
    """description, extend and targets of a class.toml."""
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where('description')}: expected a string")
    extend = data.get("extend", False)
    if not isinstance(extend, bool):
        raise ConfigError(f"{where('extend')}: expected true or false")
    targets = data.get("targets", [])
    if "targets" in data and (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t in TARGETS for t in targets)
    ):
        raise ConfigError(
            f"{where('targets')}: expected a non-empty list of {' and '.join(TARGETS)}, "
            f"got {targets!r}"
        )
    return description, extend, tuple(targets)


def _check_package_table(
    data: dict[str, Any], where: Locate
) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(install, remove, recommends) of the [packages] table."""
    packages = data.get("packages", {})
    if not isinstance(packages, dict):
        raise ConfigError(f"{where('packages')}: [packages] must be a table")
    check_keys(
        packages,
        PACKAGES_KEYS,
        lambda key: where(key, "packages"),
        context=" in [packages]",
        hint="use `install`, `remove` and `recommends`",
    )
    install = _check_packages(packages.get("install", []), where("install", "packages"))
    remove = _check_packages(packages.get("remove", []), where("remove", "packages"))
    recommends = packages.get("recommends", False)
    if not isinstance(recommends, bool):
        raise ConfigError(f"{where('recommends', 'packages')}: expected true or false")
    return install, remove, recommends


def _check_packages(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of package names, got {value!r}")
    for name in value:
        if not PACKAGE_RE.match(name):
            raise ConfigError(f"{where}: {name!r} is not a valid Debian package name")
    return tuple(value)


def _check_waiver(waiver: object, where: str) -> tuple[str, str]:
    if not isinstance(waiver, dict):
        raise ConfigError(f"{where}: expected a table")
    check_keys(waiver, WAIVER_KEYS, where, hint="use `finding` and `reason`")
    finding, reason = waiver.get("finding"), waiver.get("reason")
    if finding not in FINDINGS:
        raise ConfigError(
            f"{where}: unknown finding {finding!r}", hint=f"findings: {', '.join(FINDINGS)}"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError(f"{where}: a waiver needs a written `reason`")
    assert isinstance(finding, str)
    return finding, reason.strip()


def script_header_problem(script: Path) -> str:
    """What keeps a class script from running as written, or "". `build` and
    `lint` both ask: without `#!`, the script would run through /bin/sh
    without `set -e`, and a failing command in it would be ignored."""
    with script.open("rb") as f:
        if f.read(2) != b"#!":
            return "no #! line: the script cannot be executed"
    return ""


def _find_scripts(scripts_dir: Path) -> tuple[Path, ...]:
    if not scripts_dir.is_dir():
        return ()
    scripts = []
    for script in sorted(scripts_dir.iterdir()):
        if script.name.startswith("."):
            continue
        if not script.is_file() or not os.access(script, os.X_OK):
            raise ConfigError(
                f"{script}: class scripts must be executable files",
                hint=f"chmod +x {script}",
            )
        scripts.append(script)
    return tuple(scripts)


@dataclass(frozen=True)
class MergedClasses:
    packages: tuple[str, ...]
    recommends: tuple[str, ...]  # those of `packages` to install with their Recommends
    remove_packages: tuple[str, ...]
    repositories: tuple[dict[str, Any], ...]
    settings_layers: tuple[dict[str, Any], ...]
    debconf: str
    waivers: dict[str, tuple[str, str]]  # finding -> (reason, class)
    users: tuple[User, ...]
    interfaces: tuple[Interface, ...]


def class_layers(classes: tuple[ClassDef, ...]) -> list[ClassDef]:
    """Every class layer in application order: the built-in a class extends first."""
    return [layer for c in classes for layer in c.layers()]


def merge_classes(classes: tuple[ClassDef, ...]) -> MergedClasses:
    """Apply the merge rules over the classes, in order (last class wins)."""
    install: dict[str, str] = {}  # package name -> spec, in first-seen order
    with_recommends: dict[str, bool] = {}  # as the last class that installs it says
    remove: dict[str, None] = {}
    repositories: dict[str, dict[str, Any]] = {}
    layers = []
    debconf = []
    waivers: dict[str, tuple[str, str]] = {}
    applied = class_layers(classes)
    for cls in applied:
        for spec in cls.install:
            install[package_name(spec)] = spec
            with_recommends[package_name(spec)] = cls.recommends
            remove.pop(package_name(spec), None)
        for spec in cls.remove:
            install.pop(package_name(spec), None)
            remove[package_name(spec)] = None
        for repo in cls.repositories:
            repositories[repo["name"]] = repo
        layers.append(cls.settings)
        if cls.debconf:
            debconf.append(cls.debconf.rstrip("\n") + "\n")
        for finding, reason in cls.waivers:
            waivers[finding] = (reason, cls.name)
    return MergedClasses(
        packages=tuple(install.values()),
        recommends=tuple(spec for name, spec in install.items() if with_recommends[name]),
        remove_packages=tuple(remove),
        repositories=tuple(repositories.values()),
        settings_layers=tuple(layers),
        debconf="".join(debconf),
        waivers=waivers,
        users=merge_users([c.users for c in applied]),
        interfaces=merge_interfaces([c.interfaces for c in applied]),
    )
