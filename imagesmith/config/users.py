"""Users as classes declare them: `[[users]]` tables of class.toml.

A later class's user of the same name replaces the earlier one. The
customise stage creates them (tree/accounts.py).

Root's password is locked unless the `root_password_hash` setting gives a
hash: no image ever ships a known default password. A user without a
`password_hash` has a locked password (SSH keys still work).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from imagesmith.config.tomlfile import check_keys
from imagesmith.errors import ConfigError

USER_KEYS = {"name", "uid", "groups", "shell", "password_hash", "sudo", "authorized_keys"}
NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
HASH_RE = re.compile(r"^\$[0-9a-z]+\$\S+$")


@dataclass(frozen=True)
class User:
    name: str
    uid: int | None = None
    groups: tuple[str, ...] = ()
    shell: str = "/bin/bash"
    password_hash: str = ""  # empty: the password is locked
    sudo: bool = False
    authorized_keys: tuple[str, ...] = ()


def check_user(table: object, where: str) -> User:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    check_keys(table, USER_KEYS, where)
    name = table.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name) or name == "root":
        raise ConfigError(
            f'{where}: `name` must be a user name like "admin" (root is set by root_password_hash)'
        )
    uid = table.get("uid")
    if uid is not None and (
        not isinstance(uid, int) or isinstance(uid, bool) or not 1000 <= uid < 60000
    ):
        raise ConfigError(f"{where}: `uid` must be an integer from 1000 to 59999")
    groups = table.get("groups", [])
    keys = table.get("authorized_keys", [])
    for key, value in (("groups", groups), ("authorized_keys", keys)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: `{key}` must be a list of strings")
    for group in groups:
        if not NAME_RE.match(group):
            raise ConfigError(f"{where}: {group!r} is not a valid group name")
    shell = table.get("shell", "/bin/bash")
    if not isinstance(shell, str) or not shell.startswith("/"):
        raise ConfigError(f"{where}: `shell` must be an absolute path")
    password_hash = table.get("password_hash", "")
    if not isinstance(password_hash, str) or (password_hash and not HASH_RE.match(password_hash)):
        raise ConfigError(
            f"{where}: `password_hash` must be a crypt(3) hash",
            hint="make one with `mkpasswd -m yescrypt` or `openssl passwd -6`; never a plain password",
        )
    sudo = table.get("sudo", False)
    if not isinstance(sudo, bool):
        raise ConfigError(f"{where}: `sudo` must be true or false")
    return User(name, uid, tuple(groups), shell, password_hash, sudo, tuple(keys))


def implied_packages(users: tuple[User, ...]) -> tuple[str, ...]:
    return ("sudo",) if any(u.sudo for u in users) else ()


def merge_users(layers: list[tuple[User, ...]]) -> tuple[User, ...]:
    users: dict[str, User] = {}
    for layer in layers:
        for user in layer:
            users[user.name] = user
    return tuple(users.values())


def users_from(tables: Any, where: str) -> tuple[User, ...]:
    if not isinstance(tables, list):
        raise ConfigError(f"{where}: use [[users]] tables")
    return tuple(check_user(t, f"{where} [[users]] #{i + 1}") for i, t in enumerate(tables))
