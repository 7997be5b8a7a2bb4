"""FAI classes and variables, as FAI defines them.

With `-N`, FAI's fai-class order: DEFAULT, the output of each executable
`class/[0-9][0-9]*` script in name order (`*.sh` files are sourced and may set
`$newclasses`), `$LOGDIR/additional-classes`, the classes listed in a file
`class/HOSTNAME`, `$ADDCLASSES`, the host name, LAST. The `-c` classes reach
the scripts as `$cmdlineclasses` (FAI's own `class/01-classes` prints them).
Without `-N`, the classes are exactly the `-c` list, as `fai -c` does.

Then `class/CLASS.var` files are sourced, class by class, by a real bash with
`ifclass` on PATH, and `$LOGDIR/additional.var` after them; every variable
they set is kept. All of it runs inside `readonly_host_argv()`'s sandbox: the
config space's code can read the build host but not write to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from imagesmith.errors import ConfigError
from imagesmith.host.run import run
from imagesmith.host.sandbox import SANDBOX_SPACE, SANDBOX_TOOLS, readonly_host_argv

FAI_DATA = Path(__file__).parent.parent / "data" / "fai"
CLASS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class FaiClasses:
    classes: tuple[str, ...]  # in priority order, the last wins; each once
    variables: tuple[tuple[str, str], ...]  # what the .var files set, in name order
    duplicates: tuple[str, ...]  # classes defined more than once


def unique_classes(classes: list[str]) -> tuple[list[str], list[str]]:
    """Each class once, at its last (highest-priority) place, and the classes
    that were defined more than once."""
    seen: set[str] = set()
    kept: list[str] = []
    for name in reversed(classes):
        if name not in seen:
            seen.add(name)
            kept.append(name)
    duplicates = sorted({n for n in classes if classes.count(n) > 1})
    return list(reversed(kept)), duplicates


def parse_resolver_output(out: bytes) -> tuple[list[str], dict[str, str]]:
    """`classes A B C\\n` then NUL-separated NAME=VALUE records."""
    text = out.decode("utf-8", "replace")
    first, _, rest = text.partition("\n")
    if not first.startswith("classes"):
        raise ConfigError(f"defining the FAI classes gave no class list: {text[:200]!r}")
    variables: dict[str, str] = {}
    for record in rest.split("\0"):
        name, sep, value = record.partition("=")
        if sep:
            variables[name] = value
    return first.split()[1:], variables


def resolve_fai_classes(
    space: Path, cmdline: list[str], *, renew: bool, hostname: str
) -> FaiClasses:
    if not (space / "class").is_dir():
        raise ConfigError(f"{space}: no class/ folder; is this an FAI config space?")
    if not renew and not cmdline:
        raise ConfigError("no FAI classes: give -c CLASSES, -N, or both")
    for name in cmdline:
        if not CLASS_RE.match(name):
            raise ConfigError(f"-c {name!r}: not a class name")
    env = {
        "FAI": SANDBOX_SPACE,
        "cmdlineclasses": " ".join(cmdline),
        "renewclass": "1" if renew else "0",
        "HOSTNAME": hostname,
        "LOGDIR": "/tmp/fai",
        "PATH": f"{SANDBOX_TOOLS}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": "/tmp",
    }
    script = 'exec 3>&1 1>&2; exec bash "$0"'
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", "-c", script]
    result = run(
        readonly_host_argv(space.resolve(), FAI_DATA, [*argv, f"{SANDBOX_TOOLS}/resolve-classes"]),
        capture=True,
        what="FAI class/ scripts and .var files (sandboxed)",
    )
    found, variables = parse_resolver_output(result.stdout)
    bad = [n for n in found if not CLASS_RE.match(n)]
    if bad:
        raise ConfigError(f"{space}/class: a script printed {bad[0]!r}, which is not a class name")
    classes, duplicates = unique_classes(found)
    return FaiClasses(tuple(classes), tuple(sorted(variables.items())), tuple(duplicates))
