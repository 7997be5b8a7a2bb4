"""The command line: `imagesmith VERB ...`.

Only this module turns errors into messages and exit codes: 0 success,
1 a build or test failed, 2 a usage or config error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from imagesmith import __version__, log
from imagesmith.errors import ConfigError, ImagesmithError


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


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {"filesystem": args.filesystem} if args.filesystem else {}


def resolve_requested(args: argparse.Namespace) -> list[Any]:
    """Every image asked for, resolved and checked before any of them builds."""
    from imagesmith.config import load_config_space, resolve_image

    space = load_config_space(args.config_space)
    if args.all and args.images:
        raise ConfigError("name images or give --all, not both")
    names = list(space.images) if args.all else args.images or [space.default_image]
    return [resolve_image(space, n, overrides=overrides_from(args)) for n in names]


def format_results(results: list[Any]) -> str:
    """The table `imagesmith build` ends with: one row per image."""
    from imagesmith.settings import format_size

    rows = [("image", "status", "time", "outputs")]
    for r in results:
        if r.ok:
            files = []
            for path in r.outputs.values():
                st = path.stat()
                size = format_size(st.st_size)
                if st.st_blocks * 512 < st.st_size // 2:  # sparse: say what it really holds
                    size += f", {format_size(st.st_blocks * 512)} allocated"
                files.append(f"{path.name} ({size})")
            detail = ", ".join(files)
        else:
            detail = r.error
        rows.append((r.name, "ok" if r.ok else "FAILED", f"{r.duration:.1f}s", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{name:<{widths[0]}}  {status:<{widths[1]}}  {time:>{widths[2]}}  {detail}".rstrip()
        for name, status, time, detail in rows
    )


def cmd_build(args: argparse.Namespace) -> int:
    from imagesmith.build import build_images

    if args.jobs < 1:
        raise ConfigError(f"-j {args.jobs}: the number of jobs must be at least 1")
    images = resolve_requested(args)
    results = build_images(
        images,
        output_dir=args.output,
        cache_dir=args.cache_dir,
        uuid_seed=args.uuid_seed or "",
        jobs=args.jobs,
    )
    print(format_results(results), flush=True)
    failed = [r for r in results if not r.ok]
    if failed:
        names = ", ".join(r.name for r in failed)
        print(
            f"imagesmith: error: {len(failed)} of {len(results)} failed: {names}", file=sys.stderr
        )
    return max((r.exit_code for r in failed), default=0)


def cmd_summary(args: argparse.Namespace) -> int:
    from imagesmith.summary import print_summary

    for image in resolve_requested(args):
        print_summary(image)
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from imagesmith.qemu import boot_interactive

    return boot_interactive(
        args.image_file,
        memory=args.memory,
        snapshot=args.snapshot,
        ssh_port=args.ssh_port,
        firmware=args.firmware,
    )


def cmd_test(args: argparse.Namespace) -> int:
    from imagesmith.qemu import test_image, write_report

    result = test_image(
        args.image_file,
        checks_dir=args.checks,
        timeout=args.timeout,
        memory=args.memory,
        in_place=args.in_place,
        console_log=args.console_log,
        firmware=args.firmware,
    )
    if args.report is not None:
        write_report(result, args.report)
    print(result.summary())
    return 0 if result.passed else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from imagesmith.verify import verify_image_file

    findings, waived = verify_image_file(args.image_file, args.manifest)
    for finding in waived:
        print(f"waived: {finding.line()}")
    for finding in findings:
        print(finding.line())
    if findings:
        print(f"{args.image_file}: {len(findings)} finding(s)", file=sys.stderr)
        return 1
    print(f"{args.image_file}: clean", file=sys.stderr)
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    from imagesmith.config import load_config_space
    from imagesmith.lint import lint_config_space

    space = load_config_space(args.config_space)
    problems, resolved = lint_config_space(space)
    for problem in problems:
        print(problem.line())
    print(
        f"{space.config_file}: {resolved} of {len(space.images)} image(s) resolved, "
        f"{len(problems)} problem(s)",
        file=sys.stderr,
    )
    return 1 if problems else 0


def add_firmware_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--firmware", choices=("uefi", "bios"),
        help="boot under UEFI (OVMF) or a PC BIOS (SeaBIOS); default: what the image's "
        "manifest (IMAGE.manifest.json beside it) records, the first of both for a hybrid "
        "image, else uefi",
    )  # fmt: skip


def cmd_cache(args: argparse.Namespace) -> int:
    from imagesmith import cacheadmin
    from imagesmith.build import default_cache_dir
    from imagesmith.settings import parse_size

    cache_dir = args.cache_dir or default_cache_dir()
    if args.action == "list":
        print(f"cache directory {cache_dir}")
        print(cacheadmin.format_entries(cacheadmin.list_entries(cache_dir)))
        return 0
    if not (args.all or args.max_age or args.max_size):
        raise ConfigError(
            "cache prune: say what to remove", hint="--max-age 30d, --max-size 20GiB or --all"
        )
    removed = cacheadmin.prune(
        cache_dir,
        max_age=cacheadmin.parse_age(args.max_age) if args.max_age else None,
        max_size=parse_size(args.max_size, where="--max-size") if args.max_size else None,
        everything=args.all,
    )
    print(f"removed {len(removed)} entries from {cache_dir}")
    if removed:
        print(cacheadmin.format_entries(removed))
    return 0


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
    build.set_defaults(func=cmd_build)

    summary = verbs.add_parser(
        "summary",
        help="show what an image would be, building nothing",
        description="Print the resolved classes, packages, partitions and outputs of images without building.",
    )
    add_config_args(summary)
    summary.set_defaults(func=cmd_summary)

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
        "--ssh-port",
        type=int,
        metavar="PORT",
        help="forward 127.0.0.1:PORT on this machine to the guest's SSH port",
    )
    boot.set_defaults(func=cmd_boot)

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
        "--report",
        type=Path,
        metavar="FILE",
        help="write the result and every check's output (its last 200 lines) here, as JSON",
    )
    test.set_defaults(func=cmd_test)

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
    verify.set_defaults(func=cmd_verify)

    lint = verbs.add_parser(
        "lint",
        help="check a config space: every image, every class script",
        description="Resolve every image of the config space and check the class scripts "
        "(a #! line, `set -e` in shell scripts, shell syntax). Builds nothing.",
    )
    add_config_space_arg(lint)
    lint.set_defaults(func=cmd_lint)

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
    cache.set_defaults(func=cmd_cache)
    return parser


def interrupt_on_sigterm() -> None:
    """SIGTERM (from `kill`, a CI timeout, systemd) cleans up like Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.set_verbose(args.verbose)
    interrupt_on_sigterm()
    try:
        return int(args.func(args))
    except ImagesmithError as e:
        print(f"imagesmith: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("imagesmith: interrupted; cleaned up", file=sys.stderr)
        return 130
