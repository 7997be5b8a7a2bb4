"""What each verb does: `cmd_VERB(args)` returns the exit code.

Errors are raised as the project's error types; `main()` in __init__.py turns
them into messages and exit codes.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from imagesmith.build import ImageResult, build_images, default_cache_dir, sweep_dead_builds
from imagesmith.cache import admin as cacheadmin
from imagesmith.cache.keys import hygiene_key
from imagesmith.cache.remote import RemoteEntry, finalize_remote, list_remote
from imagesmith.config.settings import format_size, parse_size
from imagesmith.config.space import ResolvedImage, load_config_space, resolve_image
from imagesmith.errors import ConfigError
from imagesmith.fai.convert import ImportRequest, import_fai_space, split_names
from imagesmith.host import overlay
from imagesmith.host.signing import make_key_set
from imagesmith.inspect.lint import lint_config_space
from imagesmith.inspect.qemu import Enrolment, boot_interactive
from imagesmith.inspect.summary import print_summary
from imagesmith.inspect.verify import verify_image_file
from imagesmith.inspect.vmtest import test_image, write_report
from imagesmith.plan import format_plan, plan_entries


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {"filesystem": args.filesystem} if args.filesystem else {}


def resolve_requested(args: argparse.Namespace) -> list[ResolvedImage]:
    """Every image asked for, resolved and checked before any of them builds."""
    space = load_config_space(args.config_space)
    if args.all and args.images:
        raise ConfigError("name images or give --all, not both")
    names = list(space.images) if args.all else args.images or [space.default_image]
    return [resolve_image(space, n, overrides=overrides_from(args)) for n in names]


def format_results(results: list[ImageResult]) -> str:
    """The table `imagesmith build` ends with: one row per image."""
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
    if args.jobs < 1:
        raise ConfigError(f"-j {args.jobs}: the number of jobs must be at least 1")
    images = resolve_requested(args)
    # Before any thread starts: the builds mount their cached trees there.
    overlay.enter_private_namespace()
    results = build_images(
        images,
        output_dir=args.output,
        cache_dir=args.cache_dir,
        uuid_seed=args.uuid_seed or "",
        jobs=args.jobs,
        remote=finalize_remote(
            args.cache_remote,
            pull_only=args.cache_remote_pull_only,
            insecure=args.cache_remote_insecure,
        ),
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
    for image in resolve_requested(args):
        print_summary(image)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    entries = plan_entries(resolve_requested(args), with_index=args.index)
    print(
        format_plan(
            entries,
            args.format,
            config_space=str(args.config_space),
            output_dir=args.output,
            job_template=args.job_template,
            with_index=args.index,
        )
    )
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    return boot_interactive(
        args.image_file,
        memory=args.memory,
        snapshot=args.snapshot,
        ssh_port=args.ssh_port,
        firmware=args.firmware,
        display=check_display(args.display),
        enrolments=enrolments(args),
    )


def enrolments(args: argparse.Namespace) -> list[Enrolment]:
    """--mok and --db: certificates to trust in the VM's firmware variables."""
    return [Enrolment(where, cert) for where in ("mok", "db") if (cert := getattr(args, where))]


def check_display(display: str | None) -> str:
    if display is None:
        return ""
    if display == "window" or re.fullmatch(r"vnc:\d{1,2}", display):
        return display
    raise ConfigError(f"--display {display!r}: expected window or vnc:N (N from 0 to 99)")


def cmd_test(args: argparse.Namespace) -> int:
    result = test_image(
        args.image_file,
        checks_dir=args.checks,
        timeout=args.timeout,
        memory=args.memory,
        in_place=args.in_place,
        console_log=args.console_log,
        firmware=args.firmware,
        screenshot=args.screenshot,
        enrolments=enrolments(args),
    )
    if args.report is not None:
        write_report(result, args.report)
    print(result.summary())
    return 0 if result.passed else 1


def cmd_keys(args: argparse.Namespace) -> int:
    for path in make_key_set(args.target, common_name=args.name):
        print(path)
    print(
        f"{args.target}: db.key is the private key: keep it on the build host, outside the "
        "config space; enrol db.crt or db.der (see docs/secure-boot.md)",
        file=sys.stderr,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    key = hygiene_key(default_cache_dir(), create=False)
    result = verify_image_file(args.image_file, args.manifest, key=key)
    findings, waived = result.findings, result.waived
    for binary in result.boot_path:
        print(f"secure boot: {binary.line()}")
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
    space = load_config_space(args.config_space)
    problems, resolved = lint_config_space(space)
    for problem in problems:
        print(problem.line())
    print(
        f"{space.config_file}: {resolved} of {len(space.images)} image(s) resolved, "
        f"{len(problems)} problem(s)",
        file=sys.stderr,
    )
    if resolved < len(space.images):
        return ConfigError.exit_code
    return 1 if problems else 0


def format_remote_entries(entries: list[RemoteEntry]) -> str:
    lines = [f"{'KEY':<34} {'KIND':<14} {'SIZE':>10} {'CREATED':<20} IMAGE"]
    for e in entries:
        lines.append(
            f"{e.key:<34} {e.kind:<14} {format_size(e.size):>10} {e.created:<20} {e.image}"
        )
    return "\n".join(lines)


def cmd_cache(args: argparse.Namespace) -> int:
    if args.remote:
        if args.action != "list":
            raise ConfigError(
                "cache prune --remote: prune a registry with its own garbage collection",
                hint="see docs/scale-out.md",
            )
        remote = finalize_remote(args.remote, insecure=args.cache_remote_insecure)
        assert remote is not None
        print(f"remote stage cache {remote.ref}")
        print(format_remote_entries(list_remote(remote)))
        return 0
    cache_dir = args.cache_dir or default_cache_dir()
    if args.action == "list":
        print(f"cache directory {cache_dir}")
        print(cacheadmin.format_entries(cacheadmin.list_entries(cache_dir)))
        return 0
    if not (args.all or args.max_age or args.max_size):
        raise ConfigError(
            "cache prune: say what to remove", hint="--max-age 30d, --max-size 20GiB or --all"
        )
    swept = sweep_dead_builds()  # scratch of killed builds, whatever the policy
    removed = cacheadmin.prune(
        cache_dir,
        max_age=cacheadmin.parse_age(args.max_age) if args.max_age else None,
        max_size=parse_size(args.max_size, where="--max-size") if args.max_size else None,
        everything=args.all,
    )
    print(f"removed {len(removed)} entries from {cache_dir}")
    if swept:
        print(f"removed {len(swept)} leftovers of killed builds")
    if removed:
        print(cacheadmin.format_entries(removed))
    return 0


def cmd_fai_import(args: argparse.Namespace) -> int:
    request = ImportRequest(
        space=args.fai_space,
        classes=list(split_names(args.classes)),
        renew=args.new,
        hostname=args.hostname,
        size=args.size,
        suite=args.suite,
        output=args.output,
        mirror=args.mirror,
        components=split_names(args.components),
        offline=args.offline,
        cache_dir=default_cache_dir(),
    )
    print(import_fai_space(request), end="")
    print(f"Wrote {args.output}; build it with: imagesmith build -C {args.output}")
    return 0
