"""Stage: customise the tree with the classes' files, removals and scripts.

Needs: `ctx.tree` with packages installed.
Produces: the tree with, in class order,

1. each class's `files/` tree copied in (the last class wins per path; owner
   root, modes as in the config space; existing directories keep theirs);
2. packages the classes `remove` purged;
3. /etc/hostname and /etc/hosts, users and root's password
   (tree/accounts.py), the network stack of a disk image (tree/network.py);
4. each class's `scripts/` run in name order, chrooted into the tree, with the
   helpers from `imagesmith/data/helpers` (fcopy, ainsl) on PATH and
   IMAGESMITH_CLASSES, IMAGESMITH_CLASS, IMAGESMITH_IMAGE and IMAGESMITH_ROOT
   in the environment.

Files are extracted by tar inside the chroot, so symlinks in the image (like
merged /usr's /lib) resolve inside the image, never on the host.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from imagesmith import log
from imagesmith.config.classes import ClassDef, class_layers
from imagesmith.context import BuildContext
from imagesmith.host.paths import remove_in_root, write_in_root
from imagesmith.host.sandbox import run_in_root
from imagesmith.host.tarfiles import as_root
from imagesmith.tree.accounts import configure_accounts
from imagesmith.tree.network import configure_network

HELPERS = Path(__file__).parent.parent / "data" / "helpers"
RUN_DIR = "/run/imagesmith"
POLICY_RC_D = "usr/sbin/policy-rc.d"


def tar_tree(source: Path) -> bytes:
    """A tar stream of `source`, every entry owned by root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in sorted(source.iterdir()):
            tar.add(entry, arcname=entry.name, filter=as_root)
    return buffer.getvalue()


def copy_class_files(ctx: BuildContext) -> None:
    for cls in class_layers(ctx.image.classes):
        if cls.files_dir is None:
            continue
        log.debug(f"    files of class {cls.name}")
        run_in_root(
            ctx.tree,
            ["tar", "-x", "--keep-directory-symlink", "--no-overwrite-dir", "-C", "/", "-f", "-"],
            input=tar_tree(cls.files_dir),
            what=f"copying files/ of class {cls.name!r}",
        )


def remove_packages(ctx: BuildContext) -> None:
    if not ctx.image.remove_packages:
        return
    run_in_root(
        ctx.tree,
        ["apt-get", "purge", "-y", "--autoremove", *ctx.image.remove_packages],
        what="removing packages",
    )


def configure_hostname(ctx: BuildContext) -> None:
    hostname = ctx.image.settings.hostname
    write_in_root(ctx.tree, "etc/hostname", f"{hostname}\n")
    write_in_root(
        ctx.tree,
        "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n",
    )


def script_environment(ctx: BuildContext, cls: ClassDef) -> dict[str, str]:
    fcopy_path = ":".join(
        f"{RUN_DIR}/fcopy/{i:02d}-{c.name}"
        for i, c in enumerate(class_layers(ctx.image.classes))
        if c.fcopy_dir is not None
    )
    return {
        "PATH": f"{RUN_DIR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "IMAGESMITH_IMAGE": ctx.image.name,
        "IMAGESMITH_CLASSES": " ".join(ctx.image.class_names),
        "IMAGESMITH_CLASS": cls.name,
        "IMAGESMITH_ROOT": "/",
        "IMAGESMITH_FCOPY_PATH": fcopy_path,
    }


def run_class_scripts(ctx: BuildContext) -> None:
    classes = class_layers(ctx.image.classes)
    if not any(c.scripts for c in classes):
        return
    ro_binds = [(HELPERS, f"{RUN_DIR}/bin")] + [
        (c.fcopy_dir, f"{RUN_DIR}/fcopy/{i:02d}-{c.name}")
        for i, c in enumerate(classes)
        if c.fcopy_dir is not None
    ]
    # Services must not start inside the build.
    write_in_root(ctx.tree, POLICY_RC_D, "#!/bin/sh\nexit 101\n", mode=0o755)
    try:
        for cls in classes:
            for script in cls.scripts:
                log.info(f"    class {cls.name}: scripts/{script.name}")
                run_in_root(
                    ctx.tree,
                    [f"{RUN_DIR}/class/{script.name}"],
                    env=script_environment(ctx, cls),
                    ro_binds=[*ro_binds, (script.parent, f"{RUN_DIR}/class")],
                    what=f"class {cls.name!r} script scripts/{script.name}",
                )
    finally:
        remove_in_root(ctx.tree, POLICY_RC_D)


def customize_tree(ctx: BuildContext) -> None:
    copy_class_files(ctx)
    remove_packages(ctx)
    configure_hostname(ctx)
    configure_accounts(ctx.tree, ctx.image.users, ctx.image.settings.root_password_hash)
    if ctx.image.target == "disk":  # a container's network is its runtime's business
        configure_network(ctx.tree, ctx.image.settings.network, ctx.image.interfaces)
    run_class_scripts(ctx)
