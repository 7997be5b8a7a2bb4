"""Stage: first boot on any machine: the build's side of growth and identity.

Needs: `ctx.tree` customised (every class's files and scripts applied),
`ctx.layout`. Runs before boot setup, which builds the initramfs.
Produces, as the image's switches ask (see settings.py):

- `new_fs_uuid`: /etc/initramfs-tools/conf.d/imagesmith-new-fs-uuid naming
  the UUID the root filesystem is built with. The initramfs script of the
  built-in class `new-fs-uuid` gives the root a new one on first boot, but
  only while it still has this one;
- `new_ssh_host_keys`: finalize.py removes the SSH host keys
  openssh-server's postinst made, which every copy would share; the
  built-in class `new-ssh-host-keys` has them made on each machine;
- always: an empty /etc/machine-id (finalize.py), so systemd makes one on
  first boot.

The hooks and units themselves are files of the built-in classes
(`imagesmith/data/classes/`), which the switches add to the image; growth
(`grow_root`) needs nothing from the build beyond them. This stage writes
only what depends on the build: the UUID the root is made with.
"""

from __future__ import annotations

from imagesmith.context import BuildContext

FS_UUID_CONF = "etc/initramfs-tools/conf.d/imagesmith-new-fs-uuid"


def fs_uuid_conf_text(fs_uuid: str) -> str:
    return (
        "# Written by imagesmith: the UUID the root filesystem was built with.\n"
        "# While the root still has it, the initramfs script of the built-in class\n"
        "# new-fs-uuid gives the root a new random UUID before mounting it.\n"
        f"IMAGESMITH_IMAGE_FS_UUID={fs_uuid}\n"
    )


def configure_new_fs_uuid(ctx: BuildContext) -> None:
    conf = ctx.tree / FS_UUID_CONF
    if not ctx.image.settings.new_fs_uuid:
        conf.unlink(missing_ok=True)
        return
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(fs_uuid_conf_text(ctx.layout.root.fs_uuid))


def configure_first_boot(ctx: BuildContext) -> None:
    configure_new_fs_uuid(ctx)
