"""FAI's package_config/CLASS files, read as FAI's install_packages reads them.

```
PACKAGES install-norec [release=SUITE] [CLASS... | CLASS-EXPRESSION]
pkg pkg- pkg+ pkg/release pkg=version ${var}
```

A `PACKAGES` line with classes applies when any of them is defined; with
`! && || ( )` it is a class expression. Words expand `${var}` and `$var`
from the .var files. Actions: `install`, `install-norec`, `aptitude`,
`aptitude-r`, `apt`, `cupt`, `cupt-r` install; `remove` removes; `taskinst
TASK` installs Debian's `task-TASK`. In an install list `pkg-` removes and
`pkg+` installs; in a remove list `pkg+` installs. The rest (hold, unpack,
taskrm, dselect-upgrade, PRELOAD and other distributions' actions) is noted,
not carried over. With the archive's package names at hand (`known`), a
word is resolved against them as FAI does, and unknown packages are dropped
with a note naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from imagesmith.errors import ConfigError
from imagesmith.fai.report import Note

INSTALL_ACTIONS = {"install", "install-norec", "aptitude", "aptitude-r", "apt", "cupt", "cupt-r"}
NOTED_ACTIONS = {
    "hold", "unpack", "taskrm", "dselect-upgrade", "clean-internal", "y2i", "y2r", "zypper",
    "zypper-pattern", "zypper-product", "zypper-rm", "yast", "rpmr", "urpmi", "urpme",
    "yumgroup", "yumi", "yumr", "dnfgroup", "dnfi", "dnfr", "smarti", "smartr",
    "pacman-S", "pacman-Rns", "apk-add", "apk-del",
}  # fmt: skip
VARIABLE_RE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
TOKEN_RE = re.compile(r"\s*(&&|\|\||!|\(|\)|[^\s&|!()]+)")


@dataclass
class Packages:
    install: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)


def class_expression_true(expression: str, classes: set[str]) -> bool:
    """FAI's class expressions: names, !, &&, ||, parentheses."""
    tokens = TOKEN_RE.findall(expression)
    pos = 0

    def peek() -> str:
        return str(tokens[pos]) if pos < len(tokens) else ""

    def take() -> str:
        nonlocal pos
        pos += 1
        return str(tokens[pos - 1])

    def term() -> bool:
        token = take() if pos < len(tokens) else ""
        if token == "!":
            return not term()
        if token == "(":
            value = disjunction()
            if take() != ")":
                raise ValueError("missing )")
            return value
        if token in ("", ")", "&&", "||"):
            raise ValueError(f"unexpected {token or 'end'}")
        return token in classes

    def conjunction() -> bool:
        value = term()
        while peek() == "&&":
            take()
            value = term() and value
        return value

    def disjunction() -> bool:
        value = conjunction()
        while peek() == "||":
            take()
            value = conjunction() or value
        return value

    result = disjunction()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]}")
    return result


def line_applies(rest: str, classes: set[str]) -> bool:
    if not rest.strip():
        return True
    if re.search(r"[!&|()]", rest):
        return class_expression_true(rest, classes)
    return any(name in classes for name in rest.split())


def expand_variables(word: str, variables: dict[str, str]) -> str:
    return VARIABLE_RE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), word)


def resolve_known_word(word: str, known: set[str]) -> tuple[str, bool] | None:
    """(package, install?) as FAI's clean_pkg_list resolves an install-list
    word against the archive's names; None: the package is unknown."""
    if word in known:  # also g++, memtest86+
        return word, True
    if word.endswith("-") and word[:-1] in known:
        return word[:-1], False
    if word.endswith("+") and word[:-1] in known:
        return word[:-1], True
    plain = re.split(r"[/=]", word, maxsplit=1)[0]
    if plain in known or plain.split(":", 1)[0] in known:  # pkg/release, pkg=v, pkg:arch
        return word, True
    return None


def resolve_word(word: str, removing: bool, known: set[str] | None) -> tuple[str, bool] | None:
    """(package, install?) for one package word, as FAI and apt resolve it;
    None: the package is unknown (install lists only: FAI passes remove lists
    to apt unchecked)."""
    if removing:
        if word.endswith("+") and (known is None or word not in known):
            return word[:-1], True  # apt-get purge pkg+ installs pkg
        return word, False
    if known is None:  # no names at hand: a trailing - removes, as apt reads it
        return (word[:-1], False) if word.endswith("-") else (word, True)
    return resolve_known_word(word, known)


def read_package_config(
    path: Path,
    label: str,
    classes: set[str],
    variables: dict[str, str],
    known: set[str] | None = None,
) -> Packages:
    out = Packages()
    action, release, active = "", "", False
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        where = f"{label}:{number}"
        if not line:
            continue
        if re.match(r"^PRELOAD(RM)?\s", line):
            out.notes.append(Note(where, "PRELOAD", "not carried over; use a class's debs/"))
            continue
        head = re.match(r"^PACKAGES\s+(\S+)\s*(release=\S+)?\s*(.*)$", line)
        if head:
            action, release = head.group(1), (head.group(2) or "")[len("release=") :]
            if action not in INSTALL_ACTIONS | NOTED_ACTIONS | {"remove", "taskinst"}:
                raise ConfigError(f"{where}: unknown action PACKAGES {action}")
            try:
                active = line_applies(head.group(3), classes)
            except ValueError as e:
                raise ConfigError(f"{where}: class expression {head.group(3)!r}: {e}") from e
            if active and action in NOTED_ACTIONS:
                out.notes.append(Note(where, f"PACKAGES {action}", "not carried over"))
            continue
        if not action:
            raise ConfigError(f"{where}: a package before any PACKAGES line")
        if not active or action in NOTED_ACTIONS:
            continue
        for word in line.split():
            word = expand_variables(word, variables)
            if not word:
                continue
            if action == "taskinst":
                if known is None or f"task-{word}" in known:
                    out.install.append(f"task-{word}")
                else:
                    out.notes.append(
                        Note(
                            where, f"unknown task {word}", f"dropped: no task-{word} in the archive"
                        )
                    )
                continue
            resolved = resolve_word(word, action == "remove", known)
            if resolved is None:
                out.notes.append(Note(where, f"unknown package {word}", "dropped, as FAI drops it"))
                continue
            name, install = resolved
            if install and release and not re.search(r"[/=]", name):
                name = f"{name}/{release}"
            (out.install if install else out.remove).append(name)
    return out
