"""The command line's parser: one function per verb, each with its --help."""

from __future__ import annotations

import argparse
from pathlib import Path

from imagesmith import __version__
from imagesmith.cli import commands
from imagesmith.inspect.qemu import QEMU_FIRMWARES
from imagesmith.plan import FORMATS, GITLAB_TEMPLATE_JOB


def add_config_space_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-C", "--config-space", type=Path, default=Path("."), metavar="DIR",
        help="config space directory holding imagesmith.toml (default: .)",
    )  # fmt: skip


def add_config_args(parser: argparse.ArgumentParser) -> None:
    add_config_space_arg(parser)
    parser.add_argument(
        "images", nargs="*", metavar="IMAGE",
        help="image name(s) from imagesmith.toml (default: its default_image)",
    )  # fmt: skip
    parser.add_argument(
        "-a", "--all", action="store_true", help="every image of the config space",
    )  # fmt: skip
    parser.add_argument(
        "--fs", "--filesystem", dest="filesystem", choices=("ext4", "btrfs"),
        help="root filesystem, overriding the config",
    )  # fmt: skip


def add_firmware_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--firmware", choices=QEMU_FIRMWARES,
        help="boot under UEFI (OVMF), UEFI with Secure Boot enforced and Microsoft's keys "
        "enrolled (uefi-secureboot), or a PC BIOS (SeaBIOS); default: what the image's "
        "manifest (IMAGE.manifest.json beside it) records, the first of both for a hybrid "
        "image (uefi-secureboot for an image built with secure_boot), else uefi",
    )  # fmt: skip
    parser.add_argument(
        "--mok", type=Path, metavar="CERT",
        help="with uefi-secureboot: enrol CERT (PEM or DER, such as db.crt of `imagesmith "
        "keys`) as a Machine Owner Key in the VM's copy of the firmware variables",
    )  # fmt: skip
    parser.add_argument(
        "--db", type=Path, metavar="CERT",
        help="with uefi-secureboot: add CERT to the firmware's db (beside Microsoft's) in the "
        "VM's copy of the firmware variables, to boot an image whose own key signs its "
        "unified kernel image (uki = true)",
    )  # fmt: skip


def add_remote_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-remote", metavar="REF",
        help="share package stages through this OCI registry repository "
        "(HOST[:PORT]/REPOSITORY; default $IMAGESMITH_CACHE_REMOTE): pull a missing stage "
        "from it, push a stage built here (docs/scale-out.md)",
    )  # fmt: skip
    parser.add_argument(
        "--cache-remote-pull-only", action="store_true",
        help="never push to the remote stage cache (also $IMAGESMITH_CACHE_REMOTE_MODE=pull)",
    )  # fmt: skip
    parser.add_argument(
        "--cache-remote-insecure", action="store_true",
        help="talk to the registry over plain HTTP or unverified TLS "
        "(also $IMAGESMITH_CACHE_REMOTE_INSECURE=1); for a registry on loopback",
    )  # fmt: skip


def add_build_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    build = verbs.add_parser(
        "build",
        help="build one image, several, or --all",
        description="Build disk and container images. One image failing does not stop the "
        "others; the command ends with a table of every image's status, time and outputs, "
        "and exits non-zero if any failed.",
    )
    add_config_args(build)
    build.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out"),
        metavar="DIR",
        help="output directory (default: ./out)",
    )
    build.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="shared cache (.debs); default /var/cache/imagesmith or $IMAGESMITH_CACHE_DIR",
    )
    build.add_argument(
        "--uuid-seed",
        metavar="TEXT",
        help="derive partition and filesystem UUIDs from TEXT (reproducible output) instead of random ones",
    )
    build.add_argument(
        "-j", "--jobs", type=int, default=1, metavar="N",
        help="build up to N images at once (default 1); images with the same packages "
        "install them once either way",
    )  # fmt: skip
    add_remote_args(build)
    build.set_defaults(func=commands.cmd_build)


def add_summary_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    summary = verbs.add_parser(
        "summary",
        help="show what an image would be, building nothing",
        description="Print the resolved classes, packages, partitions and outputs of images without building.",
    )
    add_config_args(summary)
    summary.set_defaults(func=commands.cmd_summary)


def add_boot_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    boot = verbs.add_parser(
        "boot",
        help="start a built image in QEMU on the terminal",
        description="Boot a disk image (raw, qcow2 or raw.zst) in QEMU under UEFI or BIOS firmware; the serial console is this terminal (Ctrl-A X quits).",
    )
    boot.add_argument("image_file", type=Path, metavar="IMAGE_FILE")
    add_firmware_arg(boot)
    boot.add_argument("-m", "--memory", type=int, default=1024, metavar="MiB")
    boot.add_argument(
        "--snapshot", action="store_true", help="discard the guest's writes to the disk"
    )
    boot.add_argument(
        "--display",
        metavar="WHERE",
        help='give the guest a screen: "window" (QEMU\'s window) or "vnc:N" (VNC display N '
        "on 127.0.0.1, port 5900+N)",
    )
    boot.add_argument(
        "--ssh-port",
        type=int,
        metavar="PORT",
        help="forward 127.0.0.1:PORT on this machine to the guest's SSH port",
    )
    boot.set_defaults(func=commands.cmd_boot)


def add_keys_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = verbs.add_parser(
        "keys",
        help="make a Secure Boot key set (db key and certificate)",
        description='Make db.key (the private key, mode 0600), db.crt and db.der in DIR with openssl, for secure_boot = "own". Keep DIR on the build host, outside the config space; see docs/secure-boot.md.',
    )
    keys.add_argument("target", type=Path, metavar="DIR")
    keys.add_argument(
        "--name", default="imagesmith Secure Boot key", help="the certificate's common name"
    )
    keys.set_defaults(func=commands.cmd_keys)


def add_test_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    test = verbs.add_parser(
        "test",
        help="boot an image headless and check it from inside",
        description="Boot a disk image (raw, qcow2 or raw.zst) headless in QEMU and pass only when checks run inside the guest succeed: multi-user reached with no failed units, root mounted read-write, a serial getty active, plus any --checks scripts.",
    )
    test.add_argument("image_file", type=Path, metavar="IMAGE_FILE")
    add_firmware_arg(test)
    test.add_argument(
        "--checks",
        type=Path,
        metavar="DIR",
        help="directory of executable check scripts to copy into the guest and run as root",
    )
    test.add_argument(
        "--timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="give up after this long (default 300)",
    )
    test.add_argument("-m", "--memory", type=int, default=1024, metavar="MiB")
    test.add_argument(
        "--in-place",
        action="store_true",
        help="let the guest write to IMAGE_FILE (default: a throwaway overlay)",
    )
    test.add_argument(
        "--console-log", type=Path, metavar="FILE", help="keep the serial console log here"
    )
    test.add_argument(
        "--screenshot",
        type=Path,
        metavar="FILE",
        help="give the guest a display (and at least 4 GiB), check that the display manager "
        "and its greeter run, and save a PNG of the screen here; a blank screen fails",
    )
    test.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="write the result and every check's output (its last 200 lines) here, as JSON",
    )
    test.set_defaults(func=commands.cmd_test)


def add_verify_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = verbs.add_parser(
        "verify",
        help="scan a built image for build-time leftovers, without booting it",
        description="The hygiene scan: report, one line per finding, build secrets, private "
        "keys, apt credentials, build-only repositories, unsafe-io or eatmydata, "
        "policy-rc.d, nobarrier mounts, SSH host keys, a machine-id, the build host's "
        "resolv.conf or apt proxy, and a password-less or well-known root password. "
        "Reads disk images (raw, qcow2) and rootfs tarballs without mounting them. "
        "Exit code 1 when anything is found.",
    )
    verify.add_argument("image_file", type=Path, metavar="IMAGE_FILE")
    verify.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="the build manifest with waivers and secret digests (default: beside the image)",
    )
    verify.set_defaults(func=commands.cmd_verify)


def add_lint_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lint = verbs.add_parser(
        "lint",
        help="check a config space: every image, every class script",
        description="Resolve every image of the config space and check the class scripts "
        "(a #! line, `set -e` in shell scripts, shell syntax). Builds nothing.",
    )
    add_config_space_arg(lint)
    lint.set_defaults(func=commands.cmd_lint)


def add_fai_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fai = verbs.add_parser(
        "fai",
        help="bring an FAI config space along",
        description="Convert an FAI config space once into an imagesmith config space "
        "(see docs/fai.md).",
    )
    sub = fai.add_subparsers(dest="fai_verb", required=True, metavar="import")
    imp = sub.add_parser(
        "import",
        help="convert an FAI config space",
        description="Resolve the FAI classes as fai-diskimage does, and write an imagesmith "
        "config space that runs the FAI pieces at build time, plus FAI-IMPORT.txt listing "
        "what did not carry over.",
    )
    imp.add_argument("fai_space", type=Path, metavar="FAI_SPACE")
    imp.add_argument(
        "-c", "--class", dest="classes", default="", metavar="CLASSES",
        help="FAI classes, comma separated, as fai-diskimage -c",
    )  # fmt: skip
    imp.add_argument(
        "-N", "--new", action="store_true", help="run class/[0-9]* to define classes, as FAI -N"
    )
    imp.add_argument("--hostname", default="debian", help="host name (default: debian)")
    imp.add_argument("--size", default="", help="disk image size, as fai-diskimage -S")
    imp.add_argument("--suite", default="trixie", help="Debian suite (default: trixie)")
    imp.add_argument(
        "--mirror", default="", metavar="URI",
        help="archive to read package names from and build with (default: the build "
        "host's Debian archive in its apt sources)",
    )  # fmt: skip
    imp.add_argument(
        "--components", default="", metavar="LIST",
        help="archive components besides main, comma separated (default: those of the space's "
        "files/etc/apt/sources.list*, else main)",
    )  # fmt: skip
    imp.add_argument(
        "--offline", action="store_true",
        help="read no package names from the archive: unknown packages are not dropped",
    )  # fmt: skip
    imp.add_argument(
        "-o", "--output", type=Path, required=True, metavar="NEW_SPACE",
        help="the imagesmith config space to write (a new folder)",
    )  # fmt: skip
    imp.set_defaults(func=commands.cmd_fai_import)


def add_cache_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = verbs.add_parser(
        "cache",
        help="list and prune the caches",
        description="List the caches (package-stage trees, initramfs images, .debs) with size and time since last use, or prune them.",
    )
    cache.add_argument("action", nargs="?", choices=("list", "prune"), default="list")
    cache.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="default /var/cache/imagesmith or $IMAGESMITH_CACHE_DIR",
    )
    cache.add_argument(
        "--max-age",
        metavar="AGE",
        help="prune: remove entries unused for longer than AGE (30d, 12h)",
    )
    cache.add_argument(
        "--max-size",
        metavar="SIZE",
        help="prune: then remove the least recently used until the caches hold at most SIZE",
    )
    cache.add_argument(
        "--all", action="store_true", help="prune: remove everything, .debs included"
    )
    cache.add_argument(
        "--remote", metavar="REF",
        help="list: the entries of this remote stage cache (HOST[:PORT]/REPOSITORY) instead; "
        "prune remote entries with the registry's own garbage collection (docs/scale-out.md)",
    )  # fmt: skip
    cache.add_argument(
        "--cache-remote-insecure", action="store_true",
        help="with --remote: plain HTTP or unverified TLS",
    )  # fmt: skip
    cache.set_defaults(func=commands.cmd_cache)


def add_plan_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = verbs.add_parser(
        "plan",
        help="print a build plan for a CI system, building nothing",
        description="One entry per image: its target, outputs, package-stage key and the "
        "images that share it. In each group of images with one key, the first builds the "
        "stage and the others wait for it (a `needs:`) and take it from the remote stage "
        "cache. The key is computed without the archive's index state unless --index is "
        "given. --format gitlab prints a child pipeline, --format github a strategy.matrix "
        "pair for fromJSON (docs/scale-out.md).",
    )
    add_config_space_arg(plan)
    plan.add_argument(
        "images", nargs="*", metavar="IMAGE",
        help="image name(s) from imagesmith.toml (default: its default_image)",
    )  # fmt: skip
    plan.add_argument(
        "-a", "--all", action="store_true", help="every image of the config space",
    )  # fmt: skip
    plan.add_argument("--format", choices=FORMATS, default="json", help="default json")
    plan.add_argument(
        "--index", action="store_true",
        help="fetch every repository's index state (network) for the exact stage keys",
    )  # fmt: skip
    plan.add_argument(
        "-o", "--output", default="out", metavar="DIR",
        help="gitlab: the jobs' output directory, kept as artifacts (default: out)",
    )  # fmt: skip
    plan.add_argument(
        "--job-template", default="", metavar="FILE",
        help=f"gitlab: include FILE (in the repository) and let every job extend its "
        f"{GITLAB_TEMPLATE_JOB} job (runner tags, image, before_script)",
    )  # fmt: skip
    plan.set_defaults(func=commands.cmd_plan, filesystem=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagesmith",
        description="Build Debian-family system images from a config space of classes.",
    )
    parser.add_argument("--version", action="version", version=f"imagesmith {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show every command and its output"
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    add_build_verb(verbs)
    add_summary_verb(verbs)
    add_plan_verb(verbs)
    add_boot_verb(verbs)
    add_test_verb(verbs)
    add_verify_verb(verbs)
    add_keys_verb(verbs)
    add_lint_verb(verbs)
    add_cache_verb(verbs)
    add_fai_verb(verbs)
    for verb in verbs.choices.values():  # `imagesmith build -v` too, as people type it
        verb.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
            help="show every command and its output",
        )  # fmt: skip
    return parser
