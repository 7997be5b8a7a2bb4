"""Stage: bootstrap and packages, in one mmdebstrap run.

Needs: the resolved image (suite, mirror, repositories, packages, debconf).
Produces: `ctx.tree`, a root tree with every package installed.

Every repository and the whole merged package set go to apt in one resolver
pass. Build-only measures that never ship:

- update-initramfs is diverted to a no-op while packages install, so the
  initramfs is built once, at the end of boot setup (see bootloader.py);
- .debs come from and go to a cache outside the tree, shared by all builds,
  so a second build of the same image downloads nothing. Files are copied, never
  bind-mounted: mmdebstrap empties the archive folder at cleanup;
- mmdebstrap runs in a private mount namespace, so its mounts cannot leak.

The finished tree is kept in the stage cache (stagecache.py) under a key of
everything that can change it; a build whose key matches restores that tree
and skips mmdebstrap entirely.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
from pathlib import Path

from imagesmith import __version__, log, stagecache
from imagesmith.context import BuildContext
from imagesmith.errors import BuildError, ConfigError
from imagesmith.mirrors import image_mirror
from imagesmith.repositories import BuildSources, prepare_build_sources
from imagesmith.run import run
from imagesmith.sandbox import private_mounts_argv

ARCHIVES = "/var/cache/apt/archives"

DIVERT_INITRAMFS = (
    'chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs'
    ' && printf "#!/bin/sh\\n# diverted by imagesmith during the build\\nexit 0\\n"'
    ' > "$1/usr/sbin/update-initramfs" && chmod 755 "$1/usr/sbin/update-initramfs"'
)


def cache_in_hook(cache: str) -> str:
    q = shlex.quote(cache)
    return (
        f'mkdir -p "$1{ARCHIVES}" && '
        f"find {q} -maxdepth 1 -name '*.deb' -exec cp -t \"$1{ARCHIVES}\" {{}} +"
    )


def cache_out_hook(cache: str) -> str:
    # Each .deb lands under a temporary name first, so an interrupted build
    # never leaves a truncated file in the shared cache.
    q = shlex.quote(cache)
    return (
        f'for f in "$1{ARCHIVES}"/*.deb; do [ -e "$f" ] || continue; '
        f'n={q}/"${{f##*/}}"; [ -e "$n" ] || '
        f'{{ cp "$f" "$n.part" && mv "$n.part" "$n"; }}; done'
    )


def mmdebstrap_argv(ctx: BuildContext, mirror: str, sources: BuildSources) -> list[str]:
    image = ctx.image
    s = image.settings
    packages = [*image.packages, *(p for p in sources.local_packages if p not in image.packages)]
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
    mirror_line = f"deb {mirror} {s.suite} {' '.join(s.components)}"
    return [*argv, s.suite, str(ctx.tree), mirror_line, *sources.lines]


def stage_tool_version() -> str:
    """This stage's code and the mmdebstrap script: a new version of either changes the key."""
    mmdebstrap = shutil.which("mmdebstrap") or "mmdebstrap"
    code = [Path(__file__), Path(__file__).with_name("repositories.py")]
    ours = hashlib.sha256(b"".join(p.read_bytes() for p in code)).hexdigest()[:16]
    theirs = hashlib.sha256(Path(mmdebstrap).read_bytes()).hexdigest()[:16]
    return f"imagesmith {__version__} bootstrap {ours}; mmdebstrap {theirs}"


def install_packages(ctx: BuildContext) -> None:
    ctx.deb_cache.mkdir(parents=True, exist_ok=True)
    image = ctx.image
    mirror = image_mirror(image)
    ctx.extra["mirror"] = mirror
    sources = prepare_build_sources(ctx)
    try:
        ctx.extra["secrets"] = sources.secrets
        ctx.extra["build_repositories"] = sources.build_only_uris
        index_state = stagecache.fetch_index_state(
            stagecache.index_sources(image, mirror, sources.directory)
        )
        inputs = stagecache.stage_key_inputs(
            image, mirror=mirror, index_state=index_state, tool_version=stage_tool_version()
        )
        key = stagecache.stage_key(inputs)
        with stagecache.locked(ctx.cache_dir, key):
            if stagecache.restore_tree(ctx.cache_dir, key, ctx.tree):
                log.info(f"    stage cache hit {key}: mmdebstrap skipped")
                ctx.extra["stage_cache"] = {"key": key, "hit": True}
                return
            log.info(f"    stage cache miss {key}")
            log.info(f"    {len(image.packages)} packages from {mirror} ({image.settings.suite})")
            try:
                run(private_mounts_argv(mmdebstrap_argv(ctx, mirror, sources)), what="mmdebstrap")
            except BuildError as e:
                raise explain_apt_error(ctx, e) from e
            info = {"image": image.name, "inputs": inputs}
            stagecache.save_tree(ctx.cache_dir, key, ctx.tree, info)
        ctx.extra["stage_cache"] = {"key": key, "hit": False}
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
        f"{c.path / 'class.toml'}"
        for c in ctx.image.classes
        for layer in c.layers()
        if any(spec.split("=")[0].split("/")[0] == package for spec in layer.install)
    ]
    where = owners[-1] if owners else "the package set"
    return ConfigError(
        f"{where}: package {package!r} not found in {ctx.image.settings.suite}",
        hint="check the name (apt-cache search) and the repositories of the image",
    )
