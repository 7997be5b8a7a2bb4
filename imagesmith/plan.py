"""The build plan for CI: which images to build, and which build shares whose package stage.

`imagesmith plan` resolves images, builds nothing, and groups them by their
package-stage key (cache/stages.py). In each group the first image builds
the stage; the others wait for it and then take the stage from the remote
stage cache (cache/remote.py) instead of running mmdebstrap themselves.

The exact key also covers the archive's index state, which needs the
network. By default the plan groups by the key *without* index state, as
`build --all -j N` orders its work: images in one group share a stage
whenever they build against the same index state, which is what a CI
pipeline's jobs do when they run within minutes of each other. With
`with_index=True` the plan fetches the index state and gives the exact keys
a build made now would look up.

Three formats:

- `json`: one entry per image (`plan_entries()`);
- `gitlab`: a child pipeline, one job per image; a waiting job `needs:` the
  job that builds its stage. JSON is YAML, so the output is written as JSON;
- `github`: `{"first": MATRIX, "then": MATRIX}` for `fromJSON()`, where each
  MATRIX is a `strategy.matrix` (`{"include": [...]}`); the `then` job needs
  the `first` job.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imagesmith.cache import index
from imagesmith.cache import stages as stagecache
from imagesmith.config.space import ResolvedImage
from imagesmith.formats import output_path
from imagesmith.host.aptsources import archive_mirror
from imagesmith.stages.bootstrap import stage_tool_version
from imagesmith.tree.aptsources import prepare_build_sources

FORMATS = ("json", "gitlab", "github")
GITLAB_STAGES = ("package-stages", "images")
# A job template the child pipeline's jobs extend when `--job-template FILE`
# is given: runner tags, the container image, `before_script`, ...
GITLAB_TEMPLATE_JOB = ".imagesmith-build"


@dataclass(frozen=True)
class PlanEntry:
    name: str
    target: str
    outputs: list[str]  # file names in the output directory
    stage_key: str
    shares_stage_with: list[str]  # the other images with the same key
    builds_stage: bool  # True: this image runs mmdebstrap (or hits the cache) first
    needs: list[str]  # the image whose job builds the stage, when it is not this one


def plan_stage_key(image: ResolvedImage, *, with_index: bool) -> str:
    """The image's package-stage key, or its key without index state."""
    mirror = archive_mirror(image.settings.mirror)
    if not with_index:
        inputs = stagecache.stage_key_inputs(
            image, mirror=mirror, index_state={}, tool_version=stage_tool_version()
        )
        return stagecache.stage_key(inputs)
    sources = prepare_build_sources(image)
    try:
        state = index.fetch_index_state(index.index_sources(image, mirror, sources.directory))
    finally:
        shutil.rmtree(sources.directory, ignore_errors=True)
    inputs = stagecache.stage_key_inputs(
        image, mirror=mirror, index_state=state, tool_version=stage_tool_version()
    )
    return stagecache.stage_key(inputs)


def plan_entries(images: list[ResolvedImage], *, with_index: bool = False) -> list[PlanEntry]:
    keys = {image.name: plan_stage_key(image, with_index=with_index) for image in images}
    groups: dict[str, list[str]] = {}
    for name, key in keys.items():
        groups.setdefault(key, []).append(name)
    entries = []
    for image in images:
        group = groups[keys[image.name]]
        builder = group[0]
        entries.append(
            PlanEntry(
                name=image.name,
                target=image.target,
                outputs=[
                    output_path(Path(), image.name, fmt).name
                    for fmt in [*image.settings.outputs, "manifest"]
                ],
                stage_key=keys[image.name],
                shares_stage_with=[n for n in group if n != image.name],
                builds_stage=builder == image.name,
                needs=[] if builder == image.name else [builder],
            )
        )
    return entries


def format_json(entries: list[PlanEntry], *, with_index: bool) -> str:
    data = {
        "stage_key": "exact (index state fetched)" if with_index else "without index state",
        "images": [asdict(e) for e in entries],
    }
    return json.dumps(data, indent=2)


def build_command(config_space: str, image: str, output_dir: str) -> str:
    return shlex.join(["imagesmith", "build", "-C", config_space, "-o", output_dir, image])


def gitlab_job_name(image: str) -> str:
    return f"build:{image}"


def format_gitlab(
    entries: list[PlanEntry], *, config_space: str, output_dir: str, job_template: str = ""
) -> str:
    """A child pipeline: one job per image; waiting jobs `needs:` their stage's builder."""
    pipeline: dict[str, Any] = {}
    if job_template:
        pipeline["include"] = [{"local": job_template}]
    pipeline["stages"] = list(GITLAB_STAGES)
    for e in entries:
        job: dict[str, Any] = {}
        if job_template:
            job["extends"] = GITLAB_TEMPLATE_JOB
        job["stage"] = GITLAB_STAGES[0] if e.builds_stage else GITLAB_STAGES[1]
        if e.needs:
            # Only the order matters: the stage comes through the remote cache.
            job["needs"] = [{"job": gitlab_job_name(n), "artifacts": False} for n in e.needs]
        else:
            job["needs"] = []
        job["variables"] = {"IMAGESMITH_IMAGE": e.name, "IMAGESMITH_STAGE_KEY": e.stage_key}
        job["script"] = [build_command(config_space, e.name, output_dir)]
        job["artifacts"] = {
            "name": e.name,
            "paths": [f"{output_dir}/{f}" for f in e.outputs],
            "expire_in": "1 week",
        }
        pipeline[gitlab_job_name(e.name)] = job
    return json.dumps(pipeline, indent=2)


def format_github(entries: list[PlanEntry]) -> str:
    """`{"first": {"include": [...]}, "then": {"include": [...]}}`, on one line
    for `$GITHUB_OUTPUT`. Matrix values are strings: GitHub shows them in job names."""

    def row(e: PlanEntry) -> dict[str, str]:
        return {
            "image": e.name,
            "target": e.target,
            "outputs": " ".join(e.outputs),
            "stage_key": e.stage_key,
            "needs": " ".join(e.needs),
        }

    data = {
        "first": {"include": [row(e) for e in entries if e.builds_stage]},
        "then": {"include": [row(e) for e in entries if not e.builds_stage]},
    }
    return json.dumps(data, separators=(",", ":"))


def format_plan(
    entries: list[PlanEntry],
    fmt: str,
    *,
    config_space: str,
    output_dir: str = "out",
    job_template: str = "",
    with_index: bool = False,
) -> str:
    if fmt == "gitlab":
        return format_gitlab(
            entries, config_space=config_space, output_dir=output_dir, job_template=job_template
        )
    if fmt == "github":
        return format_github(entries)
    return format_json(entries, with_index=with_index)
