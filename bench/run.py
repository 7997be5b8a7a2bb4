#!/usr/bin/env python3
"""The imagesmith benchmark: `make bench` (as root) or `bench/run.py --help`.

Measures on the example config space, several runs each, and reports the
median:

- mmdebstrap alone, cold, with the image's package set (the yardstick);
- a cold build (empty caches);
- a warm build of every image (.debs cached, stage and initramfs caches empty);
- a rebuild after changing one file in a class;
- a rebuild after adding one package to a class;
- `build --all` (.debs cached, stage and initramfs caches empty);
- boot to the `login:` prompt on the serial console under QEMU;
- a build with an empty local cache that takes the package stage from a
  remote stage cache (a docker-registry on loopback), against a cold build
  that pushed it, in the same run.

Every build runs the real CLI in a fresh process, with a cache directory of
the benchmark's own (the machine's shared cache is never touched) and the
tree in RAM as usual. It prints a markdown table and, with --write FILE,
stores it with a description of the machine. Run it on a quiet machine: the
load average before and after is in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagesmith.config.space import load_config_space, resolve_image  # noqa: E402
from imagesmith.host.aptsources import archive_mirror  # noqa: E402
from imagesmith.inspect.qemu import pick_accel, pick_firmware, qemu_argv, vm_scratch  # noqa: E402
from imagesmith.stages.bootstrap import recommends_hook  # noqa: E402

MEASUREMENTS = (
    "cold", "warm", "one-file", "on-disk", "add-package", "all", "boot", "greeter", "peak", "pair",
    "remote",
)  # fmt: skip
ALL_JOBS = 2  # as the README runs it
Row = tuple[str, list[float], str, Callable[[float], bool] | None]


def sh(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def download_seconds(output: str) -> float:
    """The seconds apt says it spent fetching, over all its runs: its
    "Fetched 1157 MB in 49s (23.6 MB/s)" lines (verbose mmdebstrap)."""
    found = re.findall(
        r"^(?:\S+ \[\S+\])?\s*Fetched [\d.,]+ \w?B in (?:(\d+)min )?(\d+)s", output, re.M
    )
    return float(sum(60 * int(m or 0) + int(s) for m, s in found))


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return round(time.monotonic() - started, 2)


class Bench:
    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.runs = args.runs
        self.scratch = scratch
        self.space = scratch / "space"
        shutil.copytree(args.config_space, self.space, symlinks=True)
        self.cache = scratch / "cache"
        self.out = scratch / "out"
        loaded = load_config_space(self.space)
        self.images = list(loaded.images)
        self.image = args.image or loaded.default_image
        self.resolved = resolve_image(loaded, self.image)
        self.log = scratch / "bench.log"
        self.last_downloads = 0.0
        self.downloads: dict[str, list[float]] = {"alone": [], "cold": []}

    def build(
        self,
        *names: str,
        cache: Path | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        peaks: Peaks | None = None,
        verbose: bool = False,
    ) -> dict[str, object]:
        argv = [sys.executable, "-m", "imagesmith", *(["-v"] if verbose else []), "build",
                "-C", str(self.space), "-o", str(self.out),
                "--cache-dir", str(cache or self.cache), *extra, *names]  # fmt: skip
        proc = subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=REPO, env={**os.environ, **(env or {})})  # fmt: skip
        if peaks is not None:
            peaks.watch(proc)
        stdout, stderr = proc.communicate()
        result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(argv)}\n{result.stderr}\n")
        if result.returncode != 0:
            sys.exit(f"bench: build failed:\n{result.stderr[-3000:]}")
        self.last_downloads = download_seconds(result.stderr)
        name = next((n for n in reversed(names) if n in self.images), self.image)
        manifest = json.loads((self.out / f"{name}.manifest.json").read_text())
        return dict(manifest)

    def empty_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)

    def drop_built(self, cache: Path) -> None:
        """Keep the .debs, drop the stage and initramfs caches."""
        for folder in ("stages", "initramfs"):
            shutil.rmtree(cache / folder, ignore_errors=True)

    def mmdebstrap_alone(self) -> float:
        """Plain mmdebstrap with the image's packages, no cache, into RAM like imagesmith
        (no initramfs diversion, no .deb cache, no stage cache)."""
        image = self.resolved
        mirror = archive_mirror(image.settings.mirror)
        s = image.settings
        mirror_line = f"deb {mirror} {s.suite} {' '.join(s.components)}"
        target = Path(tempfile.mkdtemp(prefix="bench-mmdebstrap-", dir="/dev/shm"))
        plain = [p for p in image.packages if p not in image.recommends]
        # Classes with recommends = true: a second apt run with Recommends, as the build does.
        second = (
            [f"--customize-hook={recommends_hook(image.recommends)}"] if image.recommends else []
        )
        argv = ["mmdebstrap", "--mode=root", "--variant=apt", "--format=directory", "--verbose",
                f"--architectures={image.settings.architecture}", *second,
                f"--include={','.join(plain)}", image.settings.suite,
                str(target / "root"), mirror_line]  # fmt: skip
        try:
            started = time.monotonic()
            result = sh(["unshare", "--mount", "--propagation", "private", *argv])
            took = round(time.monotonic() - started, 2)
        finally:
            shutil.rmtree(target, ignore_errors=True)
        self.last_downloads = download_seconds(result.stdout + result.stderr)
        return took

    def cold_pairs(self) -> tuple[list[float], list[float]]:
        """Alternate mmdebstrap alone and a cold build, so both see the same conditions."""
        alone, cold = [], []
        for _ in range(self.runs):
            alone.append(self.mmdebstrap_alone())
            self.downloads["alone"].append(self.last_downloads)
            self.empty_cache()
            cold.append(timed(lambda: self.build(self.image, verbose=True)))
            self.downloads["cold"].append(self.last_downloads)
        return alone, cold

    def remote_hit(self) -> tuple[list[float], list[float]]:
        """(cold builds that push, builds with an empty local cache that pull), alternated."""
        from tests.registry import running_registry

        pushed, pulled = [], []
        with running_registry(self.scratch / "registry") as registry:
            for run in range(self.runs):
                remote = ("--cache-remote", registry.ref(f"bench{run}"), "--cache-remote-insecure")
                self.empty_cache()
                started = time.monotonic()
                self.build(self.image, extra=remote)
                pushed.append(round(time.monotonic() - started, 2))
                self.empty_cache()
                started = time.monotonic()
                hit = self.build(self.image, extra=remote)
                pulled.append(round(time.monotonic() - started, 2))
                caches = hit["caches"]
                assert isinstance(caches, dict) and caches["stage_cache"]["remote"] == "hit"
        return pushed, pulled

    def warm(self, name: str) -> list[float]:
        times = []
        for _ in range(self.runs):
            self.drop_built(self.cache)
            times.append(timed(lambda: self.build(name)))
        return times

    def one_file_change(
        self, env: dict[str, str] | None = None
    ) -> tuple[list[float], dict[str, object]]:
        # Caches warm for this image: the package stage, then (a build that
        # restores it) the filesystem cache of a btrfs image.
        while not self.build(self.image, env=env)["caches"]["stage_cache"]["hit"]:  # type: ignore[index]
            pass
        motd = self.space / "classes/example/files/etc/motd"
        times, manifest = [], {}
        for run in range(self.runs):
            motd.write_text(motd.read_text() + f"bench run {run}\n")
            started = time.monotonic()
            manifest = self.build(self.image, env=env)
            times.append(round(time.monotonic() - started, 2))
            caches = manifest.get("caches", {})
            assert isinstance(caches, dict) and caches["stage_cache"]["hit"], caches
        return times, manifest

    def add_package(self) -> list[float]:
        """Add one package the image lacks; its stage entry is dropped after each run."""
        class_file = self.space / "classes/example/class.toml"
        original = class_file.read_text()
        before = set((self.cache / "stages").iterdir())
        times = []
        try:
            class_file.write_text(
                original.replace("install = [", f'install = ["{self.args.add_package}", ', 1)
            )
            for _ in range(self.runs):
                times.append(timed(lambda: self.build(self.image)))
                for entry in set((self.cache / "stages").iterdir()) - before:
                    if entry.is_dir():  # not the per-key lock files
                        shutil.rmtree(entry)
        finally:
            class_file.write_text(original)
        return times

    def peaks(self) -> Peaks:
        """Peak memory and scratch space of one warm build (.debs cached)."""
        self.drop_built(self.cache)
        peaks = Peaks()
        self.build(self.image, peaks=peaks)
        return peaks

    def pair(self) -> tuple[float, Peaks]:
        """Two builds of the image at once (`-j 2`), .debs cached: the image and
        a copy of its table under another name, which shares its package stage."""
        toml = self.space / "imagesmith.toml"
        text = toml.read_text()
        header = f"[images.{self.image}]"
        start = text.index(header)
        end = text.find("\n[", start + len(header))
        table = text[start : end if end >= 0 else len(text)]
        twin = f"{self.image}-twin"
        toml.write_text(f"{text.rstrip()}\n\n{table.replace(header, f'[images.{twin}]', 1)}\n")
        try:
            self.drop_built(self.cache)
            peaks = Peaks()
            started = time.monotonic()
            self.build(self.image, twin, extra=("-j", "2"), peaks=peaks)
            return round(time.monotonic() - started, 2), peaks
        finally:
            toml.write_text(text)

    def boot_to_greeter(self) -> list[float]:
        """Seconds for `imagesmith test --screenshot`: boot, greeter checks, photo."""
        image = self.out / f"{self.image}.raw"
        if not image.exists():
            self.build(self.image)
        times = []
        for run in range(self.runs):
            shot = self.scratch / f"greeter-{run}.png"
            argv = [
                sys.executable,
                "-m",
                "imagesmith",
                "test",
                str(image),
                "--screenshot",
                str(shot),
            ]
            result = subprocess.run(argv, text=True, capture_output=True, cwd=REPO)
            with self.log.open("a") as log:
                log.write(f"$ {' '.join(argv)}\n{result.stderr}\n")
            if result.returncode != 0:
                sys.exit(f"bench: no greeter:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
            times.append(round(float(re.findall(r"\((\d+(?:\.\d+)?)s, ", result.stdout)[-1]), 2))
            if self.args.screenshot:
                shutil.copyfile(shot, self.args.screenshot)
        return times

    def build_all(self) -> list[float]:
        times = []
        for _ in range(self.runs):
            self.drop_built(self.cache)
            times.append(timed(lambda: self.build("--all", "-j", str(ALL_JOBS))))
        return times

    def boot_to_login(self) -> tuple[list[float], str]:
        """Seconds from QEMU's start to `login:` on the serial console, and the accelerator."""
        image = self.out / f"{self.image}.raw"
        if not image.exists():  # `--only boot`
            self.build(self.image)
        firmware = pick_firmware(image, None)
        accel = pick_accel(firmware)
        times: list[float] = []
        while len(times) < self.runs:
            with vm_scratch(image, in_place=False, firmware=firmware) as vm:
                console = vm.scratch / "console.log"
                argv = qemu_argv(disk=vm.disk, disk_fmt=vm.disk_fmt, firmware_code=vm.firmware_code,
                                 firmware_vars=vm.firmware_vars, accel=accel, memory=1024,
                                 serial=[f"file:{console}"])  # fmt: skip
                started = time.monotonic()
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
                try:
                    while b"login:" not in (console.read_bytes() if console.exists() else b""):
                        if proc.poll() is not None and accel == "kvm":
                            accel = "tcg"  # KVM unusable here, as `imagesmith test` finds too
                            break
                        if proc.poll() is not None or time.monotonic() - started > 600:
                            sys.exit(
                                f"bench: no login prompt; console:\n{console.read_text()[-2000:]}"
                            )
                        time.sleep(0.1)
                    else:
                        times.append(round(time.monotonic() - started, 2))
                finally:
                    proc.kill()
                    proc.wait()
        return times, accel


class Peaks:
    """Peak resident memory of a process and all its descendants (summed,
    sampled every 0.2 s from /proc), and peak growth of the space used on
    /dev/shm and on the filesystem of /var/tmp (work trees, cache entries,
    outputs)."""

    def __init__(self) -> None:
        self.rss = 0
        self.base = {place: shutil.disk_usage(place).used for place in ("/dev/shm", "/var/tmp")}
        self.scratch = dict.fromkeys(self.base, 0)

    def watch(self, proc: subprocess.Popen[str]) -> None:
        threading.Thread(target=self.sample, args=(proc,), daemon=True).start()

    def sample(self, proc: subprocess.Popen[str]) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while proc.poll() is None:
            children: dict[int, list[int]] = {}
            rss: dict[int, int] = {}
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                    pid = int(stat.parent.name)
                    children.setdefault(int(fields[1]), []).append(pid)
                    rss[pid] = int(fields[21]) * page
                except (OSError, IndexError, ValueError):
                    continue
            family, total = [proc.pid], 0
            while family:
                pid = family.pop()
                total += rss.get(pid, 0)
                family += children.get(pid, [])
            self.rss = max(self.rss, total)
            for place, base in self.base.items():
                grown = shutil.disk_usage(place).used - base
                self.scratch[place] = max(self.scratch[place], grown)
            time.sleep(0.2)

    def describe(self) -> str:
        gib = 1024**3
        return (
            f"peak RSS of imagesmith and its children {self.rss / gib:.2f} GiB; peak scratch: "
            + ", ".join(f"{place} {grown / gib:.2f} GiB" for place, grown in self.scratch.items())
        )


class Rows(list[Row]):
    """The table's rows; each is also shown as soon as it is measured."""

    def append(self, row: Row) -> None:
        print(f"bench: {row[0]}: {row[1]}", file=sys.stderr, flush=True)
        super().append(row)

    def __iadd__(self, rows: object) -> Rows:  # type: ignore[override,misc]
        assert isinstance(rows, list)
        for row in rows:
            self.append(row)
        return self


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def machine() -> str:
    mem = next(
        line
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            text=True, capture_output=True).stdout.strip()  # fmt: skip
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {int(mem.split()[1]) // 1024**2} GiB RAM, "
        f"kernel {platform.release()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"imagesmith {commit}"
    )


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(rows: list[Row]) -> str:
    lines = [
        "| measurement | runs (s) | median (s) | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, values, target, check in rows:
        met = "" if check is None else ("yes" if check(median(values)) else "**no**")
        lines.append(
            f"| {name} | {' '.join(f'{v:.1f}' for v in values)} | {median(values)} | {target} | {met} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark imagesmith on the example config space."
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    parser.add_argument("-C", "--config-space", type=Path, default=REPO / "examples")
    parser.add_argument("--image", help="image to measure (default: the config's default_image)")
    parser.add_argument(
        "--add-package", default="tree", help="package added in the add-one-package rebuild"
    )
    parser.add_argument("--no-boot", action="store_true", help="skip the boot measurements")
    parser.add_argument(
        "--one-file-target",
        type=float,
        default=3.0,
        metavar="S",
        help="target of the one-file rebuild (default 3, the server's; 10 for the desktop)",
    )
    parser.add_argument(
        "--on-disk-target",
        type=float,
        default=5.0,
        metavar="S",
        help="target of the one-file rebuild with the work directory on disk "
        "(default 5, the server's; 15 for the desktop)",
    )
    parser.add_argument(
        "--screenshot", type=Path, metavar="PNG", help="keep the greeter's photo here"
    )
    parser.add_argument(
        "--only", metavar="LIST", help=f"comma-separated subset of: {','.join(MEASUREMENTS)}"
    )
    parser.add_argument("--write", type=Path, metavar="FILE", help="also write the report to FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (builds need it)")
    scratch = Path(tempfile.mkdtemp(prefix="imagesmith-bench-", dir="/var/tmp"))
    try:
        bench = Bench(args, scratch)
        load_before = load()
        print(f"bench: {args.runs} runs each, scratch {scratch}, log {bench.log}", file=sys.stderr)
        want = set(args.only.split(",")) if args.only else set(MEASUREMENTS)
        rows = Rows()
        notes = []
        if "cold" in want:
            alone, cold = bench.cold_pairs()
            said = "; ".join(
                f"{k} {' '.join(f'{t:.0f}' for t in v)}" for k, v in bench.downloads.items()
            )
            notes.append(f"apt's own download time in each cold pair (s): {said}.")
            rows += [
                ("mmdebstrap alone, same packages, cold", alone, "yardstick", None),
                ("cold build (empty caches)", cold, f"≤ 1.15 × mmdebstrap = {1.15 * median(alone):.1f}",
                 lambda m: m <= 1.15 * median(alone)),
            ]  # fmt: skip
        if "warm" in want or "all" in want:
            warm = {name: bench.warm(name) for name in bench.images}
            rows += [(f"warm build `{n}` (.debs cached)", t, "", None) for n, t in warm.items()]
        manifest: dict[str, object] = {}
        if "one-file" in want:
            one_file, manifest = bench.one_file_change()
            rows.append(("rebuild after changing one file", one_file, f"≤ {args.one_file_target:g}",
                         lambda m: m <= args.one_file_target))  # fmt: skip
        if "on-disk" in want:
            (scratch / "work").mkdir(exist_ok=True)
            on_disk, _ = bench.one_file_change(env={"IMAGESMITH_WORKDIR": str(scratch / "work")})
            rows.append(("rebuild after changing one file, work directory on disk", on_disk,
                         f"≤ {args.on_disk_target:g}", lambda m: m <= args.on_disk_target))  # fmt: skip
        if "add-package" in want:
            added = bench.add_package()
            rows.append((f"rebuild after adding one package ({args.add_package})", added, "", None))
        if "all" in want:
            build_all = bench.build_all()
            limit_all = 1.5 * max(median(t) for t in warm.values())
            rows.append((f"`build --all -j {ALL_JOBS}` ({len(bench.images)} images, .debs cached)", build_all,
                         f"≤ 1.5 × slowest single = {limit_all:.1f}", lambda m: m <= limit_all))  # fmt: skip
        if "boot" in want and not args.no_boot:
            boot, accel = bench.boot_to_login()
            rows.append((f"boot to `login:` ({accel})", boot, "as short as possible", None))
        if "greeter" in want and not args.no_boot:
            rows.append(("boot to the greeter, checked and photographed (`test --screenshot`, tcg)",
                         bench.boot_to_greeter(), "reported", None))  # fmt: skip
        if "peak" in want:
            notes.append(f"Warm build of `{bench.image}`: {bench.peaks().describe()}.")
        if "pair" in want:
            took, peaks = bench.pair()
            rows.append(
                (
                    f"two `{bench.image}` builds at once (-j 2, one package stage)",
                    [took],
                    "fits",
                    None,
                )
            )
            notes.append(f"Two `{bench.image}` builds at once: {peaks.describe()}.")
        if "remote" in want:
            pushed, pulled = bench.remote_hit()
            rows += [
                ("cold build that pushes to a remote stage cache", pushed, "", None),
                ("empty local cache, remote cache hit (package stage and initramfs)", pulled,
                 f"≤ 0.3 × cold = {0.3 * median(pushed):.1f}", lambda m: m <= 0.3 * median(pushed)),
            ]  # fmt: skip
        timings = manifest.get("timings", {})
        assert isinstance(timings, dict)
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        report = f"Machine: {machine()}. Load average before {load_before}, after {load()}.\n\n"
        report += f"{table(rows)}\n"
        if stages:
            report += (
                f"\nStages of the last one-file rebuild of `{bench.image}` (the manifest cannot "
                f"time its own outputs stage): {stages}.\n"
            )
        report += "".join(f"\n{note}\n" for note in notes)
        print(report)
        if args.write:
            write_report(args.write, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def write_report(path: Path, report: str) -> None:
    marker = "<!-- bench:table -->"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{marker}\n"
    head = text.split(marker, 1)[0]
    path.write_text(f"{head}{marker}\n\n{report}")


if __name__ == "__main__":
    sys.exit(main())
