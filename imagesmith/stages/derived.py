"""A package stage made from a cached parent stage: the parent's tree with
the added packages installed by apt, instead of a whole mmdebstrap run.

Adding one package to a class changes the package stage's key, and a
desktop's 1,500 packages took minutes to install again for it. When the
stage cache holds a stage whose key inputs are the same but for a smaller
package set (cache/stages.py `parent_entry`), the build mounts that tree
(stages/cached_tree.py) and runs, chrooted into it, `apt-get update` and
`apt-get install` of the added packages with the build's own sources,
credentials and .deb cache: what `apt install` on the parent gives. The
result is saved under the new key like any package stage, and assembly
treats everything apt changed as the build's changes to the parent's
cached btrfs. `IMAGESMITH_DERIVED_STAGES=0` always runs mmdebstrap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagesmith import log
from imagesmith.cache import stages as stagecache
from imagesmith.context import BuildContext
from imagesmith.disk import incremental
from imagesmith.host.sandbox import run_in_root
from imagesmith.stages.cached_tree import restore_cached_tree
from imagesmith.tree.aptsources import BuildSources

SWITCH = "IMAGESMITH_DERIVED_STAGES"
# On the chroot's own /run (a fresh tmpfs, host/enter.py): no path of the tree leads there.
DEBS_IN_ROOT = "/run/imagesmith-debs"
SOURCES_IN_ROOT = "/run/imagesmith-build"
APT_IN_ROOT = "/run/imagesmith-apt"
KEYS_IN_ROOT = "/run/imagesmith-keys"
APT = (
    "apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confdef",
    "-o", "Dpkg::Options::=--force-confold", "-o", f"Dir::Cache::Archives={DEBS_IN_ROOT}/",
)  # fmt: skip


def install_on_parent(
    ctx: BuildContext, inputs: Mapping[str, Any], mirror_line: str, sources: BuildSources
) -> str:
    """Make the package stage from a cached parent when there is one; its
    key, or "" (then the caller runs mmdebstrap). The caller holds the new
    key's lock."""
    if os.environ.get(SWITCH) == "0":
        return ""
    found = stagecache.parent_entry(ctx.cache_dir, inputs)
    if found is None:
        return ""
    parent, added = found
    if set(added) & set(sources.local_packages):  # their repository is made per build
        return ""
    with stagecache.locked(ctx.cache_dir, parent):
        if not restore_cached_tree(ctx, parent):
            return ""
    log.info(f"    made from stage {parent}: installing {len(added)} more: {' '.join(added)}")
    ctx.tree_mark = incremental.mark(ctx.workdir)  # what apt changes is the build's change
    # The build-only sources (keys, certificates, credentials, the local
    # repository) are bound read-only on the chroot's own /run, never copied
    # into a tree whose paths a package may have pointed elsewhere.
    # So are the repositories' public key and CA files, read on the host.
    places = {str(sources.directory): SOURCES_IN_ROOT}
    for n, path in enumerate(
        {f for r in ctx.image.repositories for f in (r.signed_by, r.ca_cert) if f}
    ):
        places[path] = f"{KEYS_IN_ROOT}/{n}-{Path(path).name}"

    def moved(text: str) -> str:
        for host, inside in places.items():
            text = text.replace(host, inside)
        return text

    apt_dir = ctx.workdir / "apt"
    apt_dir.mkdir()
    (apt_dir / "apt.conf").write_text("".join(f"{moved(o)}\n" for o in sources.aptopts))
    lines = [mirror_line, *sources.lines]
    (apt_dir / "sources.list").write_text("".join(f"{moved(line)}\n" for line in lines))
    apt = [
        *APT, "-c", f"{APT_IN_ROOT}/apt.conf",
        "-o", f"Dir::Etc::SourceList={APT_IN_ROOT}/sources.list",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
    ]  # fmt: skip
    # The added packages come without Recommends (cache/stages.py `parent_entry`).
    for step in (["update"], ["install", "--no-install-recommends", *added]):
        run_in_root(
            ctx.tree,
            [*apt, *step],
            env={"DEBIAN_FRONTEND": "noninteractive"},
            binds=[(ctx.deb_cache, DEBS_IN_ROOT)],
            ro_binds=[(Path(host), inside) for host, inside in places.items()]
            + [(apt_dir, APT_IN_ROOT)],
            what=f"apt-get {step[0]} (the added packages)",
        )
    return parent
