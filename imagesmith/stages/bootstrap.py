"""Stage: bootstrap and packages, in one mmdebstrap run.

Needs: the resolved image (suite, mirror, repositories, packages, debconf).
Produces: `ctx.tree`, a root tree with every package installed.

Every repository and the whole merged package set go to apt in one resolver
pass. Build-only measures that never ship:

- update-initramfs is diverted to a no-op while packages install, so the
  initramfs is built once, at the end of boot setup (tree/initramfs.py);
- .debs come from and go to a cache outside the tree, shared by all builds,
  so a second build of the same image downloads nothing. Files are copied, never
  bind-mounted: mmdebstrap empties the archive folder at cleanup;
- mmdebstrap runs in a private mount namespace, so its mounts cannot leak.

The finished tree is kept in the stage cache (cache/stages.py) under a key of
everything that can change it; a build whose key matches restores that tree
and skips mmdebstrap entirely. With a remote stage cache (cache/remote.py),
a key the local cache lacks is looked up in the registry first, and a tree
built here is pushed there, after the hygiene scan's secret checks found
nothing in it (stages/sharing.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import shutil
from pathlib import Path

from imagesmith import __version__, log
from imagesmith.cache import index
from imagesmith.cache import stages as stagecache
from imagesmith.cache.entries import CacheUse
from imagesmith.cache.remote import STAGE
from imagesmith.config.classes import class_layers
from imagesmith.config.packages import package_name
from imagesmith.config.space import ResolvedImage
from imagesmith.context import BuildContext
from imagesmith.errors import BuildError, ConfigError
from imagesmith.host.aptsources import archive_mirror
from imagesmith.host.run import run
from imagesmith.host.sandbox import private_mounts_argv
from imagesmith.stages import derived, sharing
from imagesmith.stages.cached_tree import mount_made_tree, restore_cached_tree, save_meanwhile
from imagesmith.stages.derived import install_on_parent
from imagesmith.tree import aptsources, initramfs
from imagesmith.tree.aptsources import BuildSources, prepare_build_sources
from imagesmith.tree.initramfs import DIVERT_INITRAMFS

ARCHIVES = "/var/cache/apt/archives"


def cache_in_hook(cache: str) -> str:
    q = shlex.quote(cache)
    return (
        f'mkdir -p "$1{ARCHIVES}" && '
        f"find {q} -maxdepth 1 -name '*.deb' -exec cp -t \"$1{ARCHIVES}\" {{}} +"
    )


def cache_out_hook(cache: str) -> str:
    # Each .deb lands under a temporary name first, so an interrupted build
    # never leaves a truncated file in the shared cache. The cache is an
    # optimisation: a .deb that cannot be saved (a full disk) is skipped with
    # a warning, and never fails mmdebstrap.
    q = shlex.quote(cache)
    return (
        f'for f in "$1{ARCHIVES}"/*.deb; do [ -e "$f" ] || continue; '
        f'n={q}/"${{f##*/}}"; [ -e "$n" ] || '
        f'{{ cp "$f" "$n.part" 2>/dev/null && mv "$n.part" "$n"; }} || '
        f'{{ rm -f "$n.part"; echo "warning: could not save $n to the .deb cache" >&2; }}; '
        "done; true"
    )


def recommends_hook(packages: tuple[str, ...], cache: str | None = None) -> str:
    """The packages of classes with `recommends = true`, installed by a second
    apt run in the same mmdebstrap call (as FAI's `install` after
    `install-norec`): newly installed, they bring their Recommends.

    With a .deb `cache`, everything is downloaded first, and the .debs go to
    the cache in the background while dpkg installs them (a desktop's 1.2 GB
    took 4 s after mmdebstrap was done; dpkg leaves the other core idle)."""
    install = (
        'chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q '
        "--install-recommends -o Dpkg::Options::=--force-confdef "
        f"-o Dpkg::Options::=--force-confold {shlex.join(packages)}"
    )
    if cache is None:
        return install
    return (
        f"{install} --download-only && {{ ( {cache_out_hook(cache)} ) & }} && {install}; "
        "s=$?; wait; exit $s"
    )


def mmdebstrap_argv(ctx: BuildContext, mirror: str, sources: BuildSources) -> list[str]:
    image = ctx.image
    s = image.settings
    packages = [
        *(p for p in image.packages if p not in image.recommends),
        *(p for p in sources.local_packages if p not in image.packages),
    ]
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        "--format=directory",
        f"--architectures={s.architecture}",
        # Keep the .debs we seeded from the cache, and keep the essential
        # ones until the customize hook has copied everything out.
        "--skip=download/empty",
        "--skip=essential/unlink",
        f"--essential-hook={DIVERT_INITRAMFS}",
        f"--setup-hook={cache_in_hook(str(ctx.deb_cache))}",
        f"--setup-hook={sources.setup_hook()}",
        *(
            [f"--customize-hook={recommends_hook(image.recommends, str(ctx.deb_cache))}"]
            if image.recommends
            else []
        ),
        f"--customize-hook={cache_out_hook(str(ctx.deb_cache))}",
        f"--customize-hook={sources.cleanup_hook()}",
        *(f"--aptopt={option}" for option in sources.aptopts),
    ]
    if packages:  # a container image's classes may add none
        argv.append(f"--include={','.join(packages)}")
    if image.debconf:
        selections = ctx.workdir / "debconf-selections"
        selections.write_text(image.debconf)
        q = shlex.quote(str(selections))
        argv.append(f'--essential-hook=chroot "$1" debconf-set-selections < {q}')
    if log.is_verbose():
        argv.append("--verbose")
    return [*argv, s.suite, str(ctx.tree), mirror_line(mirror, image), *sources.lines]


def mirror_line(mirror: str, image: ResolvedImage) -> str:
    s = image.settings
    return f"deb {mirror} {s.suite} {' '.join(s.components)}"


# mmdebstrap's progress bar: "installing:   62.50 [#####.....]", or "done".
MMDEBSTRAP_PROGRESS = re.compile(r"^([a-z][a-z ]*):\s+(\d+(?:\.\d+)?)\b")


def report_progress(line: str) -> bool:
    """mmdebstrap's progress bars to the stage's progress (see log.progress)."""
    if line == "done":
        return True
    match = MMDEBSTRAP_PROGRESS.match(line)
    if match is None:
        return False
    log.progress(match.group(1), float(match.group(2)))
    return True


def stage_tool_version() -> str:
    """This stage's code and the mmdebstrap script: a new version of either changes the key."""
    mmdebstrap = shutil.which("mmdebstrap") or "mmdebstrap"
    code = [
        Path(__file__),
        Path(derived.__file__),
        Path(aptsources.__file__),
        Path(initramfs.__file__),
    ]
    ours = hashlib.sha256(b"".join(p.read_bytes() for p in code)).hexdigest()[:16]
    theirs = hashlib.sha256(Path(mmdebstrap).read_bytes()).hexdigest()[:16]
    return f"imagesmith {__version__} bootstrap {ours}; mmdebstrap {theirs}"


def install_packages(ctx: BuildContext) -> None:
    ctx.deb_cache.mkdir(parents=True, exist_ok=True)
    image = ctx.image
    mirror = ctx.mirror = archive_mirror(image.settings.mirror)
    sources = prepare_build_sources(image)
    try:
        ctx.secrets = sources.secrets
        ctx.build_repositories = sources.build_only_uris
        index_state = index.fetch_index_state(index.index_sources(image, mirror, sources.directory))
        inputs = stagecache.stage_key_inputs(
            image, mirror=mirror, index_state=index_state, tool_version=stage_tool_version()
        )
        key = stagecache.stage_key(inputs)
        with contextlib.ExitStack() as held:
            held.enter_context(stagecache.locked(ctx.cache_dir, key))
            remote = sharing.pull(ctx, key, STAGE)
            if restore_cached_tree(ctx, key):
                where = "remote stage cache" if remote == "hit" else "stage cache"
                how = "mounted" if ctx.tree_overlay else "extracted"
                log.info(f"    {where} hit {key}: mmdebstrap skipped, the tree {how}")
                ctx.stage_cache = CacheUse(key, hit=True, remote=remote)
                return
            log.info(f"    stage cache miss {key}")
            try:
                parent = install_on_parent(ctx, inputs, mirror_line(mirror, image), sources)
                if not parent:
                    log.info(
                        f"    {len(image.packages)} packages from {mirror} ({image.settings.suite})"
                    )
                    # TMPDIR: mmdebstrap's own scratch (its gpg home) goes with the workdir.
                    run(
                        private_mounts_argv(mmdebstrap_argv(ctx, mirror, sources)),
                        what="mmdebstrap",
                        env={"TMPDIR": str(ctx.workdir)},
                        progress=report_progress,
                    )
            except BuildError as e:
                raise explain_apt_error(ctx, e) from e
            # A stage made on a parent is the build's tree itself (its lower
            # layer is the parent's).
            made = (None if parent else mount_made_tree(ctx, key)) or ctx.tree
            info = {"image": image.name, "inputs": inputs, "parent": parent}
            if made != ctx.tree and not sharing.pushes(ctx, remote):
                # Read-only under the build's tree: saved while the classes
                # work, the key's lock held until it is.
                save_meanwhile(ctx, key, made, info, held.pop_all())
            else:
                stagecache.save_tree(ctx.cache_dir, key, made, info)
                remote = sharing.push(ctx, key, STAGE, remote)
        ctx.stage_cache = CacheUse(key, hit=False, remote=remote)
    finally:
        shutil.rmtree(sources.directory, ignore_errors=True)


_UNKNOWN_PACKAGE = re.compile(
    r"Unable to locate package (\S+)|Package '?(\S+?)'? has no installation candidate"
)


def explain_apt_error(ctx: BuildContext, error: BuildError) -> Exception:
    """Name the class or repository behind apt's failure where we can."""
    for repo in ctx.image.repositories:
        lines = [line for line in error.message.splitlines() if repo.uri.rstrip("/") in line]
        failing = [line for line in lines if re.search(r"\b(Err|E|W):|[Ff]ail|[Ee]rror", line)]
        if failing:
            return BuildError(
                f"repository {repo.name!r} ({repo.uri}) failed: {failing[-1].strip(' |')}",
                hint=f"defined in {repo.source}; check its URI, signing key and credentials "
                "(client_cert, client_key, auth)",
            )
    match = _UNKNOWN_PACKAGE.search(error.message)
    if not match:
        return error
    package = match.group(1) or match.group(2)
    owners = [
        f"{layer.path / 'class.toml'}"
        for layer in class_layers(ctx.image.classes)
        if any(package_name(spec) == package for spec in layer.install)
    ]
    where = owners[-1] if owners else "the package set"
    return ConfigError(
        f"{where}: package {package!r} not found in {ctx.image.settings.suite}",
        hint="check the name (apt-cache search) and the repositories of the image",
    )
