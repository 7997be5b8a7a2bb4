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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesmith.accounts import User, merge_users, users_from
from imagesmith.errors import ConfigError
from imagesmith.network import Interface, interfaces_from, merge_interfaces
from imagesmith.settings import TARGETS, check_setting
from imagesmith.tomlfile import load_toml, locate

BUILTIN_CLASSES = Path(__file__).parent / "data" / "classes"
CLASS_FILE = "class.toml"
CLASS_ENTRIES = {CLASS_FILE, "files", "fcopy", "scripts", "debs", "debconf", "README", "README.md"}
CLASS_KEYS = {
    "description", "extend", "targets", "packages", "repositories", "settings", "waivers",
    "users", "interfaces",
}  # fmt: skip
WAIVER_KEYS = {"finding", "reason"}
PACKAGES_KEYS = {"install", "remove"}
REPOSITORY_KEYS = {
    "name", "uri", "suites", "components", "signed_by", "keep",
    "client_cert", "client_key", "ca_cert", "auth",
}  # fmt: skip

CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A Debian package name, optionally with :arch, and =version or /release.
PACKAGE_RE = re.compile(
    r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+|/[A-Za-z0-9.-]+)?$"
)


@dataclass(frozen=True)
class ClassDef:
    name: str
    path: Path
    builtin: bool
    description: str = ""
    extend: bool = False
    targets: tuple[str, ...] = ()  # empty: as the class it extends, else every target
    install: tuple[str, ...] = ()
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
        cls = load_class(user, builtin=False)
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


def load_class(path: Path, *, builtin: bool) -> ClassDef:
    """Read and validate one class folder."""
    for entry in path.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.name not in CLASS_ENTRIES:
            raise ConfigError(
                f"{entry}: unknown entry in class {path.name!r}",
                hint=f"a class folder may hold: {', '.join(sorted(CLASS_ENTRIES))}",
            )
    class_file = path / CLASS_FILE
    data: dict[str, Any] = load_toml(class_file) if class_file.is_file() else {}

    def where(key: str, section: str = "") -> str:
        return locate(class_file, key, section=section)

    for key in data:
        if key not in CLASS_KEYS:
            raise ConfigError(
                f"{where(key)}: unknown key {key!r}",
                hint=f"allowed keys: {', '.join(sorted(CLASS_KEYS))}",
            )
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

    packages = data.get("packages", {})
    if not isinstance(packages, dict):
        raise ConfigError(f"{where('packages')}: [packages] must be a table")
    for key in packages:
        if key not in PACKAGES_KEYS:
            raise ConfigError(
                f"{where(key, 'packages')}: unknown key {key!r} in [packages]",
                hint="use `install` and `remove`",
            )
    install = _check_packages(packages.get("install", []), where("install", "packages"))
    remove = _check_packages(packages.get("remove", []), where("remove", "packages"))

    repositories = data.get("repositories", [])
    if not isinstance(repositories, list):
        raise ConfigError(f"{where('repositories')}: use [[repositories]] tables")
    checked_repos = tuple(
        _check_repository(r, f"{class_file} [[repositories]] #{i + 1}")
        for i, r in enumerate(repositories)
    )

    settings_table = data.get("settings", {})
    if not isinstance(settings_table, dict):
        raise ConfigError(f"{where('settings')}: [settings] must be a table")
    settings = {
        key: check_setting(key, value, where=f"{where(key, 'settings')}: [settings] {key}")
        for key, value in settings_table.items()
    }

    waivers = data.get("waivers", [])
    if not isinstance(waivers, list):
        raise ConfigError(f"{where('waivers')}: use [[waivers]] tables")
    checked_waivers = tuple(
        _check_waiver(w, f"{class_file} [[waivers]] #{i + 1}") for i, w in enumerate(waivers)
    )

    debconf_file = path / "debconf"
    debconf = debconf_file.read_text() if debconf_file.is_file() else ""
    return ClassDef(
        name=path.name,
        path=path,
        builtin=builtin,
        description=description,
        extend=extend,
        targets=tuple(targets),
        install=install,
        remove=remove,
        repositories=checked_repos,
        settings=settings,
        debconf=debconf,
        scripts=_find_scripts(path / "scripts"),
        waivers=checked_waivers,
        users=users_from(data.get("users", []), str(class_file)),
        interfaces=interfaces_from(data.get("interfaces", []), str(class_file)),
        debs=tuple(sorted((path / "debs").glob("*.deb"))),
    )


def _check_packages(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of package names, got {value!r}")
    for name in value:
        if not PACKAGE_RE.match(name):
            raise ConfigError(f"{where}: {name!r} is not a valid Debian package name")
    return tuple(value)


def _check_repository(repo: object, where: str) -> dict[str, Any]:
    if not isinstance(repo, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in repo:
        if key not in REPOSITORY_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}",
                hint=f"allowed keys: {', '.join(sorted(REPOSITORY_KEYS))}",
            )
    for key in ("name", "uri"):
        if not isinstance(repo.get(key), str) or not repo[key]:
            raise ConfigError(f"{where}: `{key}` is required and must be a string")
    for key in ("suites", "components"):
        if key in repo and (
            not isinstance(repo[key], list) or not all(isinstance(v, str) for v in repo[key])
        ):
            raise ConfigError(f"{where}: `{key}` must be a list of strings")
    for key in ("signed_by", "ca_cert", "client_cert", "client_key", "auth"):
        if not isinstance(repo.get(key, ""), str):
            raise ConfigError(f"{where}: `{key}` must be a string")
    for key in ("signed_by", "ca_cert"):  # public files, read on the build host
        if repo.get(key) and not Path(repo[key]).is_file():
            what = "signed_by key file" if key == "signed_by" else "ca_cert file"
            raise ConfigError(f"{where}: {what} {repo[key]!r} not found")
    if not isinstance(repo.get("keep", True), bool):
        raise ConfigError(f"{where}: `keep` must be true or false")
    return {**repo, "source": where}


def _check_waiver(waiver: object, where: str) -> tuple[str, str]:
    from imagesmith.verify import FINDINGS

    if not isinstance(waiver, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in waiver:
        if key not in WAIVER_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}", hint="use `finding` and `reason`")
    finding, reason = waiver.get("finding"), waiver.get("reason")
    if finding not in FINDINGS:
        raise ConfigError(
            f"{where}: unknown finding {finding!r}", hint=f"findings: {', '.join(FINDINGS)}"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError(f"{where}: a waiver needs a written `reason`")
    assert isinstance(finding, str)
    return finding, reason.strip()


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
    remove_packages: tuple[str, ...]
    repositories: tuple[dict[str, Any], ...]
    settings_layers: tuple[dict[str, Any], ...]
    debconf: str
    waivers: dict[str, tuple[str, str]]  # finding -> (reason, class)
    users: tuple[User, ...]
    interfaces: tuple[Interface, ...]


def _package_name(spec: str) -> str:
    return re.split(r"[:=/]", spec, maxsplit=1)[0]


def merge_classes(classes: tuple[ClassDef, ...]) -> MergedClasses:
    """Apply the merge rules over the classes, in order (last class wins)."""
    install: dict[str, str] = {}  # package name -> spec, in first-seen order
    remove: dict[str, None] = {}
    repositories: dict[str, dict[str, Any]] = {}
    layers = []
    debconf = []
    waivers: dict[str, tuple[str, str]] = {}
    applied = [layer for c in classes for layer in c.layers()]
    for cls in applied:
        for spec in cls.install:
            install[_package_name(spec)] = spec
            remove.pop(_package_name(spec), None)
        for spec in cls.remove:
            install.pop(_package_name(spec), None)
            remove[_package_name(spec)] = None
        for repo in cls.repositories:
            repositories[repo["name"]] = repo
        layers.append(cls.settings)
        if cls.debconf:
            debconf.append(cls.debconf.rstrip("\n") + "\n")
        for finding, reason in cls.waivers:
            waivers[finding] = (reason, cls.name)
    return MergedClasses(
        packages=tuple(install.values()),
        remove_packages=tuple(remove),
        repositories=tuple(repositories.values()),
        settings_layers=tuple(layers),
        debconf="".join(debconf),
        waivers=waivers,
        users=merge_users([c.users for c in applied]),
        interfaces=merge_interfaces([c.interfaces for c in applied]),
    )
