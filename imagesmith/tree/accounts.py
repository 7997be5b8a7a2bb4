"""Users, sudo rights, SSH keys and the root password, written into a tree.

Applied in the customise stage, chrooted into the image, with the image's own
shadow tools. Root's password is locked unless the `root_password_hash`
setting gives a hash: no image ever ships a known default password.
"""

from __future__ import annotations

from pathlib import Path

from imagesmith.config.users import User
from imagesmith.host.paths import write_in_root
from imagesmith.host.sandbox import run_in_root


def create_user(tree: Path, user: User) -> None:
    for group in user.groups:
        run_in_root(tree, ["groupadd", "-f", group], what=f"creating group {group!r}")
    argv = ["useradd", "--create-home", "--user-group", "--shell", user.shell]
    if user.uid is not None:
        argv += ["--uid", str(user.uid)]
    if user.groups:
        argv += ["--groups", ",".join(user.groups)]
    run_in_root(tree, [*argv, user.name], what=f"creating user {user.name!r}")
    if user.password_hash:
        run_in_root(
            tree,
            ["chpasswd", "--encrypted"],
            input=f"{user.name}:{user.password_hash}\n".encode(),
            what=f"setting the password of {user.name!r}",
        )
    if user.sudo:
        write_in_root(
            tree,
            f"etc/sudoers.d/imagesmith-{user.name}",
            f"{user.name} ALL=(ALL:ALL) NOPASSWD: ALL\n",
            mode=0o440,
        )
    if user.authorized_keys:
        keys = "".join(f"{k.strip()}\n" for k in user.authorized_keys)
        script = (
            'set -eu; home=$(getent passwd "$1" | cut -d: -f6); '
            'install -d -m 700 -o "$1" -g "$1" "$home/.ssh"; '
            'cat > "$home/.ssh/authorized_keys"; '
            'chown "$1:$1" "$home/.ssh/authorized_keys"; chmod 600 "$home/.ssh/authorized_keys"'
        )
        run_in_root(
            tree,
            ["sh", "-c", script, "sh", user.name],
            input=keys.encode(),
            what=f"installing authorized_keys of {user.name!r}",
        )


def set_root_password(tree: Path, password_hash: str) -> None:
    entry = f"root:{password_hash}" if password_hash else "root:*"
    # `*` locks the password; `chpasswd -e` takes the hash as it is.
    run_in_root(
        tree, ["chpasswd", "--encrypted"], input=f"{entry}\n".encode(), what="root password"
    )


def configure_accounts(tree: Path, users: tuple[User, ...], root_password_hash: str) -> None:
    set_root_password(tree, root_password_hash)
    for user in users:
        create_user(tree, user)
