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
import shlex
from collections.abc import Mapping
from typing import Any

from imagesmith import log
from imagesmith.cache import stages as stagecache
from imagesmith.context import BuildContext
from imagesmith.disk import incremental
from imagesmith.host.run import run
from imagesmith.host.sandbox import run_in_root
from imagesmith.stages.cached_tree import restore_cached_tree
from imagesmith.tree.aptsources import BuildSources

SWITCH = "IMAGESMITH_DERIVED_STAGES"
DEBS_IN_ROOT = "/run/imagesmith-debs"
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
    with stagecache.locked(ctx.cache_dir, parent):
        if not restore_cached_tree(ctx, parent):
            return ""
    log.info(f"    made from stage {parent}: installing {len(added)} more: {' '.join(added)}")
    ctx.tree_mark = incremental.mark(ctx.workdir)  # what apt changes is the build's change
    config = sources.directory / "apt.conf"
    config.write_text("".join(f"{option}\n" for option in sources.aptopts))
    (sources.directory / "sources.list").write_text(
        "".join(f"{line}\n" for line in [mirror_line, *sources.lines])
    )
    hook_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    run(["sh", "-c", sources.setup_hook(), "sh", ctx.tree], what="build sources", env=hook_env)
    try:
        apt = [
            *APT, "-c", str(config),
            "-o", f"Dir::Etc::SourceList={sources.directory / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/nonexistent",
        ]  # fmt: skip
        recommends = set(inputs["recommends"])
        steps = [
            ["update"],
            ["install", "--no-install-recommends", *(p for p in added if p not in recommends)],
            ["install", "--install-recommends", *(p for p in added if p in recommends)],
        ]
        for step in steps:
            if step[0] == "install" and len(step) == 2:
                continue
            run_in_root(
                ctx.tree,
                [*apt, *step],
                env={"DEBIAN_FRONTEND": "noninteractive"},
                binds=[(ctx.deb_cache, DEBS_IN_ROOT)],
                what=f"apt-get {shlex.join(step[:1])} (the added packages)",
            )
    finally:
        run(["sh", "-c", sources.cleanup_hook(), "sh", ctx.tree], what="build sources")
    ctx.stage_parent = parent
    return parent
