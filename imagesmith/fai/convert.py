"""`imagesmith fai import`: convert an FAI config space, once, into an
imagesmith config space that can be built, edited and linted.

What the new space holds:

- `imagesmith.toml`: one image, `fai`, with the classes `base`, `uefi`
  and/or `bios` (from FAI's GRUB_EFI / GRUB_PC classes), one imagesmith
  class per FAI class in FAI's priority order, and `fai` last;
- `classes/CLASS/`: the packages of package_config/CLASS, debconf/CLASS,
  pkgs/CLASS/*.deb, and package_config/CLASS.gpg/.asc as a trusted key;
- `classes/fai/`: a script that runs the FAI config space's hooks and
  scripts at build time, in FAI's order and environment, with the FAI space,
  FAI-compatible helpers, the variables and the plan under its `fcopy/`;
- `FAI-IMPORT.txt`: every construct that did not carry over, one per line.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from imagesmith import log
from imagesmith.config.classes import BUILTIN_CLASSES
from imagesmith.config.tomlfile import inside_space
from imagesmith.errors import ConfigError
from imagesmith.fai.archive import archive_package_names, space_components
from imagesmith.fai.classes import FAI_DATA, FaiClasses, resolve_fai_classes
from imagesmith.fai.diskconfig import disk_config_for, map_disk_config
from imagesmith.fai.packages import Packages, read_package_config
from imagesmith.fai.plan import make_plan
from imagesmith.fai.report import REPORT_FILE, Note, format_report
from imagesmith.host.aptsources import archive_mirror

RUNTIME = "fai"
ARCHITECTURE = "amd64"  # the one imagesmith builds
HELPERS = ("fcopy", "ainsl", "ifclass", "fai-link", "fai-sed", "run-fai")
RUNNER = """#!/bin/bash
# Runs the FAI config space's hooks and scripts (see ../fcopy/imagesmith-fai/plan).
set -eu
rt=
for dir in ${IMAGESMITH_FCOPY_PATH//:/ }; do
    [ -d "$dir/imagesmith-fai" ] && rt=$dir/imagesmith-fai
done
[ -n "$rt" ] || { echo "class fai: no fcopy/imagesmith-fai found" >&2; exit 1; }
exec bash "$rt/bin/run-fai" "$rt"
"""


@dataclass(frozen=True)
class ImportRequest:
    space: Path
    classes: list[str]
    renew: bool
    hostname: str
    size: str
    suite: str
    output: Path
    mirror: str = ""  # empty: the build host's Debian archive
    components: tuple[str, ...] = ()  # empty: the space's sources, else main
    offline: bool = False  # read no package names: unknown packages stay
    cache_dir: Path | None = None  # caches the archive's package names; None: no cache


def split_names(text: str) -> tuple[str, ...]:
    """A comma- or space-separated list from the command line."""
    return tuple(name for name in re.split(r"[,\s]+", text) if name)


def toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def image_class_name(name: str) -> str:
    taken = {p.name for p in BUILTIN_CLASSES.iterdir()} | {RUNTIME}
    return f"fai-{name}" if name in taken else name


def firmware_classes(classes: tuple[str, ...], notes: list[Note]) -> list[str]:
    chosen = [fw for fai, fw in (("GRUB_EFI", "uefi"), ("GRUB_PC", "bios")) if fai in classes]
    if not chosen:
        notes.append(Note("(classes)", "neither GRUB_EFI nor GRUB_PC", "UEFI boot (class uefi)"))
        chosen = ["uefi"]
    return chosen


def import_components(req: ImportRequest, fai: FaiClasses) -> tuple[str, ...]:
    """main, and --components or else those of the space's apt sources."""
    found = ["main", *(req.components or space_components(req.space, fai.classes))]
    return tuple(dict.fromkeys(found))


def known_packages(req: ImportRequest, fai: FaiClasses, notes: list[Note]) -> set[str] | None:
    """The archive's package names, or None with --offline."""
    if req.offline:
        notes.append(
            Note("package_config/", "--offline",
                 "no package names read: unknown packages stay, `pkg+` is installed as named")
        )  # fmt: skip
        return None
    mirror = archive_mirror(req.mirror)
    return archive_package_names(
        mirror, req.suite, import_components(req, fai), ARCHITECTURE, req.cache_dir
    )


def note_components(
    req: ImportRequest, fai: FaiClasses, known: set[str] | None, notes: list[Note]
) -> None:
    unknown = sum(n.construct.startswith("unknown package ") for n in notes)
    if known is not None and unknown and import_components(req, fai) == ("main",):
        notes.append(
            Note("package_config/", f"{unknown} unknown packages",
                 "looked up in main only; --components contrib,non-free-firmware,... "
                 "looks in more")
        )  # fmt: skip


def class_packages(
    req: ImportRequest, fai: FaiClasses, name: str, known: set[str] | None
) -> Packages:
    path = req.space / "package_config" / name
    if not path.is_file():
        return Packages()
    inside_space(req.space, path, "a package_config file")
    return read_package_config(
        path, f"package_config/{name}", set(fai.classes), dict(fai.variables), known
    )


def write_class(
    req: ImportRequest, fai: FaiClasses, name: str, known: set[str] | None, notes: list[Note]
) -> None:
    folder = req.output / "classes" / image_class_name(name)
    folder.mkdir(parents=True)
    packages = class_packages(req, fai, name, known)
    notes.extend(packages.notes)
    lines = [f"description = {toml_value(f'FAI class {name}, imported')}"]
    if packages.install or packages.remove:
        lines += ["", "[packages]"]
        lines += [f"install = {toml_value(sorted(set(packages.install)))}"]
        lines += [f"remove = {toml_value(sorted(set(packages.remove)))}"]
    (folder / "class.toml").write_text("\n".join(lines) + "\n")
    debconf = req.space / "debconf" / name
    if debconf.is_file():
        shutil.copyfile(inside_space(req.space, debconf, "a debconf file"), folder / "debconf")
    debs = sorted((req.space / "pkgs" / name).glob("*.deb"))
    if debs:
        (folder / "debs").mkdir()
        for deb in debs:
            shutil.copyfile(inside_space(req.space, deb, "a .deb"), folder / "debs" / deb.name)
    for suffix in ("gpg", "asc"):
        key = req.space / "package_config" / f"{name}.{suffix}"
        if key.is_file():
            keys = folder / "files/etc/apt/trusted.gpg.d"
            keys.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(
                inside_space(req.space, key, "an apt key"), keys / f"fai-{name}.{suffix}"
            )
            notes.append(
                Note(f"package_config/{name}.{suffix}", "apt key",
                     "placed in /etc/apt/trusted.gpg.d; a repository the build uses "
                     "needs a [[repositories]] table with signed_by")
            )  # fmt: skip


def write_runtime(req: ImportRequest, fai: FaiClasses, notes: list[Note]) -> None:
    folder = req.output / "classes" / RUNTIME
    runtime = folder / "fcopy" / "imagesmith-fai"
    shutil.copytree(
        req.space, runtime / "space", symlinks=True, ignore=shutil.ignore_patterns(".git")
    )
    (runtime / "bin").mkdir()
    for helper in HELPERS:
        shutil.copy2(FAI_DATA / helper, runtime / "bin" / helper)
    variables = [f"{k}={shlex.quote(v)}" for k, v in fai.variables]
    variables += [f"classes={shlex.quote(' '.join(fai.classes))}"]
    variables += [f"HOSTNAME={shlex.quote(req.hostname)}"]
    (runtime / "variables.sh").write_text(
        "# What the FAI class/*.var files set, at import time; edit freely.\n"
        + "\n".join(variables)
        + "\n"
    )
    (runtime / "plan").write_text(make_plan(req.space, fai.classes, notes))
    (folder / "scripts").mkdir()
    runner = folder / "scripts" / "50-fai"
    runner.write_text(RUNNER)
    runner.chmod(0o755)
    (folder / "class.toml").write_text(
        "description = \"Runs the imported FAI config space's hooks and scripts, FAI's way\"\n"
    )


def write_image(req: ImportRequest, fai: FaiClasses, notes: list[Note]) -> None:
    settings: dict[str, object] = {"suite": req.suite, "hostname": req.hostname}
    if req.size:
        settings["size"] = req.size
    if req.mirror:
        settings["mirror"] = req.mirror
    components = import_components(req, fai)
    if components != ("main",):
        settings["components"] = list(components)
    disk_config = disk_config_for(req.space, fai.classes)
    if disk_config is not None:
        inside_space(req.space, disk_config, "a disk_config file")
        mapping = map_disk_config(disk_config, f"disk_config/{disk_config.name}")
        settings.update(mapping.settings)
        notes.extend(mapping.notes)
    classes = ["base", *firmware_classes(fai.classes, notes)]
    classes += [image_class_name(n) for n in fai.classes] + [RUNTIME]
    lines = ['default_image = "fai"', "", "[images.fai]"]
    lines += [f"description = {toml_value(f'Imported from FAI config space {req.space}')}"]
    lines += [f"classes = {toml_value(classes)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    (req.output / "imagesmith.toml").write_text("\n".join(lines) + "\n")


def general_notes(req: ImportRequest, fai: FaiClasses) -> list[Note]:
    notes = [
        Note("class/", f"class {n} defined more than once", "kept once, at its last place")
        for n in fai.duplicates
    ]
    if req.renew:
        notes += [
            Note("class/", f"-c class {name} printed by no class/ script",
                 "not defined, as FAI -N (FAI's class/01-classes echoes $cmdlineclasses)")
            for name in req.classes
            if name not in fai.classes
        ]  # fmt: skip
    notes.append(Note("class/*.var", "variables", "evaluated once, at import (variables.sh)"))
    for name in ("FAI_DEBOOTSTRAP", "release"):
        if name in dict(fai.variables):
            notes.append(
                Note("class/*.var", f"${name}", f"suite {req.suite} from the command line")
            )
    if (req.space / "basefiles").is_dir():
        notes.append(Note("basefiles/", "base file", "imagesmith bootstraps with mmdebstrap"))
    if (req.space / "tests").is_dir():
        notes.append(Note("tests/", "FAI tests", "not run; use imagesmith test --checks"))
    return notes


def import_fai_space(req: ImportRequest) -> str:
    """Write the new space; return the report."""
    if req.output.exists() and any(req.output.iterdir()):
        raise ConfigError(f"{req.output}: exists and is not empty; give a new folder")
    fai = resolve_fai_classes(req.space, req.classes, renew=req.renew, hostname=req.hostname)
    log.info(f"FAI classes: {' '.join(fai.classes)}")
    notes = general_notes(req, fai)
    req.output.mkdir(parents=True, exist_ok=True)
    try:
        known = known_packages(req, fai, notes)
        for name in fai.classes:
            write_class(req, fai, name, known, notes)
        note_components(req, fai, known, notes)
        write_runtime(req, fai, notes)
        write_image(req, fai, notes)
    except BaseException:
        shutil.rmtree(req.output, ignore_errors=True)
        raise
    report = format_report(
        notes, f"FAI import of {req.space}, classes: {' '.join(fai.classes)}\n"
        "Not carried over, one per line (file: construct: what imagesmith does instead):"
    )  # fmt: skip
    (req.output / REPORT_FILE).write_text(report)
    return report
