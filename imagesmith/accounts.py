"""Users, sudo rights, SSH keys and the root password.

A class declares users in `[[users]]` tables of its class.toml; a later class's
user of the same name replaces the earlier one. Applied in the customise
stage, chrooted into the image, with the image's own shadow tools.

Root's password is locked unless the `root_password_hash` setting gives a
hash: no image ever ships a known default password. A user without a
`password_hash` has a locked password (SSH keys still work).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imagesmith.errors import ConfigError
from imagesmith.sandbox import run_in_root

if TYPE_CHECKING:
    from imagesmith.context import BuildContext

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
    for key in table:
        if key not in USER_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}", hint=f"allowed: {', '.join(sorted(USER_KEYS))}"
            )
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


def create_user(ctx: BuildContext, user: User) -> None:
    for group in user.groups:
        run_in_root(ctx.tree, ["groupadd", "-f", group], what=f"creating group {group!r}")
    argv = ["useradd", "--create-home", "--user-group", "--shell", user.shell]
    if user.uid is not None:
        argv += ["--uid", str(user.uid)]
    if user.groups:
        argv += ["--groups", ",".join(user.groups)]
    run_in_root(ctx.tree, [*argv, user.name], what=f"creating user {user.name!r}")
    if user.password_hash:
        run_in_root(
            ctx.tree,
            ["chpasswd", "--encrypted"],
            input=f"{user.name}:{user.password_hash}\n".encode(),
            what=f"setting the password of {user.name!r}",
        )
    if user.sudo:
        sudoers = ctx.tree / "etc/sudoers.d" / f"imagesmith-{user.name}"
        sudoers.parent.mkdir(parents=True, exist_ok=True)
        sudoers.write_text(f"{user.name} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
    if user.authorized_keys:
        keys = "".join(f"{k.strip()}\n" for k in user.authorized_keys)
        script = (
            'set -eu; home=$(getent passwd "$1" | cut -d: -f6); '
            'install -d -m 700 -o "$1" -g "$1" "$home/.ssh"; '
            'cat > "$home/.ssh/authorized_keys"; '
            'chown "$1:$1" "$home/.ssh/authorized_keys"; chmod 600 "$home/.ssh/authorized_keys"'
        )
        run_in_root(
            ctx.tree,
            ["sh", "-c", script, "sh", user.name],
            input=keys.encode(),
            what=f"installing authorized_keys of {user.name!r}",
        )


def configure_root_password(ctx: BuildContext) -> None:
    password_hash = ctx.image.settings.root_password_hash
    entry = f"root:{password_hash}" if password_hash else "root:*"
    # `*` locks the password; `chpasswd -e` takes the hash as it is.
    run_in_root(
        ctx.tree, ["chpasswd", "--encrypted"], input=f"{entry}\n".encode(), what="root password"
    )


def configure_accounts(ctx: BuildContext) -> None:
    configure_root_password(ctx)
    for user in ctx.image.users:
        create_user(ctx, user)


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
