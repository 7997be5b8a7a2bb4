"""`imagesmith lint`: check a whole config space without building anything.

Every image is resolved (so every config error surfaces at once, not only
the first image's), and every class script is checked the way dib-lint
checks diskimage-builder elements:

- it starts with a `#!` line;
- a shell script stops on errors (`set -e`, or `set -eu` and friends);
- a shell script parses (`sh -n`, or `bash -n` for bash scripts).

and every unit link in a class's files tree (`etc/systemd/*/NAME.wants/`,
`.requires/`) is a symlink: a regular file there, say one holding the link's
target as text after a copy that lost symlinks, is silently ignored by
systemd.

One line per problem, `file:line: message`. The exit code is 2 when an image
does not resolve (a config error, which `build` rejects too), 1 for script and
file problems only. `build` refuses a script without `#!` as well
(`script_header_problem()` is shared).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from imagesmith.config.classes import ClassDef, class_layers, script_header_problem
from imagesmith.config.space import ConfigSpace, resolve_image
from imagesmith.errors import ConfigError
from imagesmith.host.run import run

SET_E = re.compile(r"^\s*set\s+-[a-zA-Z]*e|^\s*set\s+-o\s+errexit", re.MULTILINE)


@dataclass(frozen=True)
class LintProblem:
    where: str
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.message}"


def lint_script(script: Path) -> list[LintProblem]:
    if problem := script_header_problem(script):
        return [LintProblem(f"{script}:1", problem)]
    text = script.read_text(errors="replace")
    first = text.splitlines()[0]
    interpreter = first[2:].strip().split()
    shell = Path(interpreter[-1] if interpreter[0].endswith("env") else interpreter[0]).name
    if shell not in ("sh", "bash", "dash"):
        return []
    problems = []
    if not SET_E.search(text):
        problems.append(
            LintProblem(
                f"{script}:1", "shell script without `set -e`: a failing command would be ignored"
            )
        )
    checker = "bash" if shell == "bash" else "sh"
    result = run([checker, "-n", str(script)], capture=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        problems.append(
            LintProblem(str(script), f"syntax error: {detail[-1] if detail else 'sh -n failed'}")
        )
    return problems


UNIT_LINK_DIRS = ("*.wants", "*.requires", "*.upholds")


def lint_unit_links(cls: ClassDef) -> list[LintProblem]:
    files = cls.files_dir
    if files is None:
        return []
    problems = []
    for pattern in UNIT_LINK_DIRS:
        for link_dir in sorted((files / "etc/systemd").glob(f"*/{pattern}")):
            for entry in sorted(link_dir.iterdir()):
                if not entry.is_symlink():
                    problems.append(
                        LintProblem(
                            str(entry),
                            "not a symlink: systemd ignores it "
                            f"(make it one: ln -sf /usr/lib/systemd/system/{entry.name} {entry})",
                        )
                    )
    return problems


def lint_config_space(space: ConfigSpace) -> tuple[list[LintProblem], int]:
    """(problems, number of images resolved)."""
    problems: list[LintProblem] = []
    seen: set[Path] = set()
    resolved = 0
    for name in space.images:
        try:
            image = resolve_image(space, name)
        except ConfigError as e:
            problems.append(LintProblem(f"image {name}", str(e)))
            continue
        resolved += 1
        for cls in class_layers(image.classes):
            if cls.builtin or cls.path in seen:
                continue
            seen.add(cls.path)
            for script in cls.scripts:
                problems += lint_script(script)
            problems += lint_unit_links(cls)
    return problems, resolved
