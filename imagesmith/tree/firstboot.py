"""The build's side of first boot on any machine: growth and identity.

The hooks and units are files of the built-in classes
(`imagesmith/data/classes/`), which the switches add to the image (see
config/settings.py). What depends on the build itself is small:

- `new_fs_uuid`: the kernel command line carries
  `imagesmith.image_fs_uuid=UUID`, the UUID the root filesystem is built
  with. The initramfs script of the built-in class `new-fs-uuid` gives the
  root a new one on first boot, but only while it still has this one. The
  UUID is on the command line, not in the initramfs, so the initramfs holds
  nothing of one build and the initramfs cache serves every build;
- `new_ssh_host_keys`: stages/finalize.py removes the SSH host keys
  openssh-server's postinst made, which every copy would share; the
  built-in class `new-ssh-host-keys` has them made on each machine;
- always: an empty /etc/machine-id (stages/finalize.py), so systemd makes one on
  first boot.

Growth (`grow_root`) needs nothing from the build beyond its class.
"""

from __future__ import annotations

from imagesmith.config.layout import DiskLayout
from imagesmith.config.settings import ImageSettings

IMAGE_FS_UUID_PARAMETER = "imagesmith.image_fs_uuid"


def first_boot_cmdline(settings: ImageSettings, layout: DiskLayout) -> list[str]:
    """Kernel command line words for the first-boot classes."""
    if not settings.new_fs_uuid:
        return []
    return [f"{IMAGE_FS_UUID_PARAMETER}={layout.root.fs_uuid}"]
