"""The whole build, top to bottom.

`build_image()` resolves nothing itself: it takes a validated
`ResolvedImage`, makes a scratch directory (in RAM when there is room), and
runs the stages in order. Each stage is a plain function of the
`BuildContext` in its own module, and returns at once when it does not apply
(a container image has no boot setup and no disk). The scratch directory is
removed whatever happens; outputs appear only when complete (see
stages/outputs.py).

`build_images()` builds several images in one run: images with the same
package installation share it through the stage cache (its per-key lock
makes them wait for one mmdebstrap run), `jobs` images build at once (the
first image of each package set starts first, so different package sets
install side by side), and one image failing never stops the others. Each
image gets an `ImageResult`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imagesmith import log
from imagesmith.cache import stages as stagecache
from imagesmith.cache.remote import RemoteCache
from imagesmith.config.classes import class_layers, script_header_problem
from imagesmith.config.layout import DiskLayout, UuidSource, plan_disk_layout
from imagesmith.config.settings import format_size
from imagesmith.config.space import ResolvedImage
from imagesmith.context import BuildContext
from imagesmith.disk.sparse import largest_file_problem
from imagesmith.errors import OUT_OF_SPACE, BuildError, ConfigError, ImagesmithError
from imagesmith.formats import OUTPUT_TEMP_RE, output_path
from imagesmith.host.aptsources import archive_mirror
from imagesmith.host.leftovers import remove_dead_owners
from imagesmith.host.run import require_tools, stop_all_processes
from imagesmith.stages.assemble_container import assemble_container
from imagesmith.stages.assemble_disk import assemble_disk
from imagesmith.stages.bootsetup import configure_boot
from imagesmith.stages.bootstrap import install_packages
from imagesmith.stages.cached_tree import PRISTINE_DIR
from imagesmith.stages.customize import customize_tree
from imagesmith.stages.filesystem_base import prepare_filesystem_base
from imagesmith.stages.finalize import finalize_tree
from imagesmith.stages.outputs import staged_outputs, write_manifest, write_outputs
from imagesmith.tree.aptsources import BUILD_DIR_PARENT, BUILD_DIR_RE

Stage = Callable[[BuildContext], None]

ALL = ("disk", "container")
# (name, stage, the targets it runs for)
STAGES: tuple[tuple[str, Stage, tuple[str, ...]], ...] = (
    ("bootstrap and packages", install_packages, ALL),
    ("filesystem base", prepare_filesystem_base, ("disk",)),
    ("customise", customize_tree, ALL),
    ("boot setup", configure_boot, ("disk",)),
    ("finalise", finalize_tree, ALL),
    ("assemble disk", assemble_disk, ("disk",)),
    ("assemble container", assemble_container, ("container",)),
)

HOST_TOOLS = ("mmdebstrap", "unshare", "dpkg-query")
PROVISIONAL_SIZE = 4 * 1024**3
DISK_TOOLS = ("sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy")
OUTPUT_TOOLS = {"qcow2": "qemu-img", "raw.zst": "zstd", "oci": "tar", "tar": "tar"}
# Build in RAM (tmpfs) when it has this much room: dpkg's fsyncs cost nothing there.
RAM_WORKDIR = Path("/dev/shm")
RAM_NEEDED = 6 * 1024**3
# A build's scratch directory names its process (host/leftovers.py).
WORKDIR_RE = re.compile(r"^imagesmith-.+-pid(\d+)-[a-z0-9_]+$")
# `IMAGESMITH_PAUSE_AFTER_STAGE=NAME` makes a build sleep after that stage,
# for tests that kill a build at a chosen point.
PAUSE_AFTER_STAGE = "IMAGESMITH_PAUSE_AFTER_STAGE"


def default_cache_dir() -> Path:
    if env := os.environ.get("IMAGESMITH_CACHE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/imagesmith")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagesmith"


def pick_workdir_parent(output_dir: Path) -> Path:
    if env := os.environ.get("IMAGESMITH_WORKDIR"):
        return Path(env)
    try:
        st = os.statvfs(RAM_WORKDIR)
        if st.f_bavail * st.f_frsize >= RAM_NEEDED:
            return RAM_WORKDIR
    except OSError:
        pass
    return output_dir


def sweep_dead_builds(output_dir: Path | None = None) -> list[Path]:
    """Remove what builds that were killed left, and only theirs: scratch
    directories, build-only sources and half-written outputs whose build
    process is gone. Returns what was removed."""
    places = [(RAM_WORKDIR, WORKDIR_RE), (BUILD_DIR_PARENT, BUILD_DIR_RE)]
    if env := os.environ.get("IMAGESMITH_WORKDIR"):
        places.append((Path(env), WORKDIR_RE))
    if output_dir is not None:
        places += [(output_dir, WORKDIR_RE), (output_dir, OUTPUT_TEMP_RE)]
    removed = [path for folder, pattern in places for path in remove_dead_owners(folder, pattern)]
    for path in removed:
        log.info(f"removed {path}: left by a build that is gone")
    return removed


def check_host(image: ResolvedImage) -> None:
    if os.geteuid() != 0:
        raise ConfigError("imagesmith build must run as root", hint="use sudo")
    tools = [*HOST_TOOLS]
    if image.target == "disk":
        tools += DISK_TOOLS
        if image.settings.filesystem == "btrfs":
            tools.append("mkfs.btrfs")
    tools += [OUTPUT_TOOLS[o] for o in image.settings.outputs if o in OUTPUT_TOOLS]
    require_tools(*dict.fromkeys(tools))


def check_disk_fits_directory(image: ResolvedImage, directory: Path) -> None:
    """A disk size the directory the disk file is made in cannot hold fails
    now, with exit 2, not at assembly after the slow stages."""
    if image.target != "disk":
        return
    problem = largest_file_problem(directory, image.settings.size)
    if problem:
        raise ConfigError(
            f"{image.config_space / 'imagesmith.toml'} [images.{image.name}] size: "
            f"a {format_size(image.settings.size)} disk: {problem}",
            hint="set a smaller size (raw images are sparse: size is the disk's length, "
            "not the space it takes), or build into another directory (-o)",
        )


def check_class_scripts(image: ResolvedImage) -> None:
    """Refuse what `imagesmith lint` refuses in a script, before any work."""
    for layer in class_layers(image.classes):
        for script in layer.scripts:
            if problem := script_header_problem(script):
                raise ConfigError(
                    f"{script}:1: {problem}",
                    hint="start it with #!/bin/sh and set -eu (imagesmith lint checks every script)",
                )


@contextlib.contextmanager
def running_stage(name: str, ctx: BuildContext) -> Iterator[None]:
    """Run one stage under its log line; a full disk becomes an error that
    says where the room ran out, not a traceback."""
    try:
        with log.stage(name, ctx.timings):
            yield
    except OSError as e:
        if e.errno not in OUT_OF_SPACE:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        raise out_of_space(ctx, f"{name}: no space left on the device{where}") from e
    except BuildError as e:  # a command that ran out of room says so in its output
        if "No space left on device" not in e.message:
            raise
        raise out_of_space(ctx, e.message) from e


def out_of_space(ctx: BuildContext, message: str) -> BuildError:
    """`message`, with the free space of every place a build writes to."""
    places = {"output": ctx.output_dir, "scratch": ctx.workdir.parent, "cache": ctx.cache_dir}
    free = []
    for what, place in places.items():
        try:
            free.append(f"{what} {place}: {format_size(shutil.disk_usage(place).free)} free")
        except OSError:
            continue
    return BuildError(
        f"{message}\n  ({'; '.join(free)})",
        hint="free some room: `imagesmith cache prune --max-size SIZE` trims the caches, "
        "-o builds elsewhere, IMAGESMITH_WORKDIR moves the scratch directory",
    )


def plan_image_layout(image: ResolvedImage, *, uuid_seed: str = "") -> DiskLayout:
    """The image's partitions. UUIDs are random for every build unless a seed
    is given: `uuid_seed` (the command line's) wins over the uuid_seed setting."""
    s = image.settings
    return plan_disk_layout(
        # size = "auto": a provisional size; assembly sizes the root to the tree.
        size=s.size or PROVISIONAL_SIZE,
        esp_size=s.esp_size,
        filesystem=s.filesystem,
        architecture=s.architecture,
        firmware=s.boot_firmware,
        uuids=UuidSource(uuid_seed or s.uuid_seed),
    )


def build_image(
    image: ResolvedImage,
    *,
    output_dir: Path,
    cache_dir: Path | None = None,
    uuid_seed: str = "",
    remote: RemoteCache | None = None,
    after_stage: Callable[[str, BuildContext], None] | None = None,
) -> BuildContext:
    """Build one image; returns the context (timings, outputs, packages)."""
    check_host(image)
    check_class_scripts(image)
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    s = image.settings
    layout = plan_image_layout(image, uuid_seed=uuid_seed)
    parent = pick_workdir_parent(output_dir)
    # The disk is assembled in the raw output's temp file, else in the workdir.
    check_disk_fits_directory(image, output_dir if "raw" in s.outputs else parent)
    with contextlib.ExitStack() as cleanup:
        workdir = Path(
            tempfile.mkdtemp(prefix=f"imagesmith-{image.name}-pid{os.getpid()}-", dir=parent)
        )
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        ctx = BuildContext(
            image=image,
            workdir=workdir,
            output_dir=output_dir,
            cache_dir=cache_dir or default_cache_dir(),
            layout=layout,
            remote_cache=remote,
        )
        cleanup.callback(ctx.closing.close)  # before the workdir goes
        skipped = ""
        if image.skipped_classes:
            names = " ".join(c.name for c in image.skipped_classes)
            skipped = f" (not for a {image.target} image: {names})"
        log.info(
            f"building {image.name} ({image.target}): classes "
            f"{' '.join(image.class_names)}{skipped}; work in {workdir}"
        )
        with staged_outputs(ctx) as staged, stopping_children_on_interrupt():
            if image.target == "disk" and "raw" in s.outputs:
                # The disk is assembled straight into the raw output's temp
                # file, which is renamed into place with the others: no copy.
                ctx.disk_file = staged.add(output_dir, image.name, "raw")
            for name, stage, targets in STAGES:
                if image.target not in targets:
                    continue
                with running_stage(name, ctx):
                    stage(ctx)
                if after_stage:
                    after_stage(name, ctx)
                if os.environ.get(PAUSE_AFTER_STAGE) == name:
                    log.info(f"pausing after {name} ({PAUSE_AFTER_STAGE})")
                    time.sleep(3600)
            # Nothing reads the tree any more: free it while the outputs are written.
            ctx.closing.close()
            remover = threading.Thread(target=remove_trees, args=(ctx,))
            remover.start()
            cleanup.callback(remover.join)
            with running_stage("outputs", ctx):
                write_outputs(ctx, staged)
                manifest = staged.add(output_dir, image.name, "manifest")
                write_manifest(ctx, manifest, dict(ctx.outputs))
        # The manifest's own timings cannot include the outputs stage it is
        # written in; the log line above has it.
        log.info(f"built {image.name} in {sum(ctx.timings.values()):.1f}s")
        for fmt in [*s.outputs, "manifest"]:
            log.info(f"    {output_path(output_dir, image.name, fmt)}")
        return ctx


@contextlib.contextmanager
def stopping_children_on_interrupt() -> Iterator[None]:
    """On Ctrl-C (or SIGTERM), stop every command at once, before the build
    waits for its background work: a SIGTERM reaches this process alone,
    and a tar or copy in the background would hold the exit up until done."""
    try:
        yield
    except KeyboardInterrupt:
        stop_all_processes()
        raise


@dataclass
class ImageResult:
    name: str
    ok: bool
    duration: float
    outputs: dict[str, Path] = field(default_factory=dict)  # format -> final file
    error: str = ""
    exit_code: int = 0


def build_one(
    image: ResolvedImage,
    *,
    output_dir: Path,
    cache_dir: Path | None,
    uuid_seed: str,
    remote: RemoteCache | None = None,
) -> ImageResult:
    """Build one image and say how it went; only an interrupt escapes."""
    started = time.monotonic()
    with log.prefix(image.name):
        try:
            ctx = build_image(
                image, output_dir=output_dir, cache_dir=cache_dir, uuid_seed=uuid_seed,
                remote=remote,
            )  # fmt: skip
        except ImagesmithError as e:
            log.info(f"imagesmith: error: {e}")
            return ImageResult(
                image.name, False, time.monotonic() - started, error=e.message.splitlines()[0],
                exit_code=e.exit_code,
            )  # fmt: skip
        except Exception as e:  # a bug: the other images still build
            log.info(f"imagesmith: internal error building {image.name}:")
            log.info(traceback.format_exc().rstrip())
            return ImageResult(
                image.name, False, time.monotonic() - started, error=f"internal error: {e!r}",
                exit_code=1,
            )  # fmt: skip
    outputs = {
        fmt: output_path(ctx.output_dir, image.name, fmt)
        for fmt in [*image.settings.outputs, "manifest"]
    }
    return ImageResult(image.name, True, time.monotonic() - started, outputs)


def remove_trees(ctx: BuildContext) -> None:
    """Remove the build's tree, and the overlay's layers when it was mounted."""
    for path in (ctx.tree, ctx.overlay_scratch, ctx.workdir / PRISTINE_DIR):
        shutil.rmtree(path, ignore_errors=True)


def package_stages_first(images: list[ResolvedImage]) -> list[ResolvedImage]:
    """The build order for parallel jobs: the first image of each package set,
    then the rest. Images with the same package stage wait for the one that
    runs mmdebstrap; a different package set can run its own meanwhile."""
    firsts: list[ResolvedImage] = []
    rest: list[ResolvedImage] = []
    seen: set[str] = set()
    for image in images:
        inputs = stagecache.stage_key_inputs(
            image, mirror=archive_mirror(image.settings.mirror), index_state={}, tool_version=""
        )
        group = stagecache.stage_key(inputs)
        (rest if group in seen else firsts).append(image)
        seen.add(group)
    return firsts + rest


def build_images(
    images: list[ResolvedImage],
    *,
    output_dir: Path,
    cache_dir: Path | None = None,
    uuid_seed: str = "",
    jobs: int = 1,
    remote: RemoteCache | None = None,
) -> list[ImageResult]:
    """Build every image, `jobs` at a time; results in the order given."""
    sweep_dead_builds(output_dir.resolve())
    build = functools.partial(
        build_one, output_dir=output_dir, cache_dir=cache_dir, uuid_seed=uuid_seed, remote=remote
    )
    if jobs <= 1 or len(images) <= 1:
        return [build(image) for image in images]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    futures = {image.name: pool.submit(build, image) for image in package_stages_first(images)}
    try:
        return [futures[image.name].result() for image in images]
    except BaseException:
        # Ctrl-C reaches only this thread: stop the queue and the running
        # commands, so every build cleans up and ends.
        pool.shutdown(wait=False, cancel_futures=True)
        stop_all_processes()
        concurrent.futures.wait(futures.values())
        raise
    finally:
        pool.shutdown(wait=True)
