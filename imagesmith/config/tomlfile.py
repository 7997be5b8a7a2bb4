"""Reading TOML files with errors that name the file and line."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from imagesmith.errors import ConfigError


def locate(path: Path, key: str, *, section: str = "") -> str:
    """'file:line' of `key = ...` (inside [section] when given), best effort."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return str(path)
    in_section = not section
    for number, line in enumerate(lines, 1):
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith("["):
            header = stripped.strip("[] ")
            in_section = not section or header == section
            if section and header == section and not key:
                return f"{path}:{number}"
            continue
        if in_section and key and stripped.split("=", 1)[0].strip().strip('"') == key:
            return f"{path}:{number}"
    return str(path)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def check_keys(
    table: Mapping[str, object],
    allowed: Collection[str],
    where: str | Callable[[str], str],
    *,
    label: str = "key",
    context: str = "",
    hint: str = "",
) -> None:
    """Reject any key of a TOML table that is not in `allowed`.

    `where` is the place to name in the error, or a function of the key that
    finds it (`file:line`); `context` follows the key, as " in [packages]".
    """
    for key in table:
        if key not in allowed:
            place = where(key) if callable(where) else where
            raise ConfigError(
                f"{place}: unknown {label} {key!r}{context}",
                hint=hint or f"allowed: {', '.join(sorted(allowed))}",
            )


def inside_space(space: Path, path: Path, what: str) -> Path:
    """`path`, once its symlinks are followed, must stay inside the config
    space: a class file that is a symlink to a host file is never read."""
    real = path.resolve()
    if (path.exists() or path.is_symlink()) and not real.is_relative_to(space.resolve()):
        raise ConfigError(
            f"{path}: {what} leads out of the config space {space}",
            hint="imagesmith reads only files inside the config space; copy the file in "
            "(secrets stay outside and are named in client_cert, client_key or auth)",
        )
    return path
