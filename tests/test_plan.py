"""`imagesmith plan`: the CI build plan, parsed and checked against what GitLab
and GitHub Actions require of a child pipeline and a strategy matrix."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import EXAMPLES, imagesmith

# The example space: the four server disk images install the same packages;
# the desktop and the container image (no kernel, no boot loader) their own.
DISK_IMAGES = ["server", "server-btrfs", "legacy", "hybrid"]
OWN_STAGE = ["desktop", "container"]
GITLAB_KEYWORDS = {"stages", "include", "default", "variables", "workflow", "image"}


def parse_yaml(text: str) -> Any:
    """What GitLab reads: YAML. The plan writes JSON, which is YAML; PyYAML
    checks that where it is installed."""
    try:
        import yaml
    except ImportError:
        return json.loads(text)
    return yaml.safe_load(text)


def plan(*args: str) -> str:
    result = imagesmith("plan", "-C", EXAMPLES, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_json_plan_groups_images_by_package_stage() -> None:
    data = json.loads(plan("--all"))
    assert data["stage_key"] == "without index state"
    entries = {e["name"]: e for e in data["images"]}
    assert list(entries) == [*DISK_IMAGES, *OWN_STAGE]
    server = entries["server"]
    assert server["target"] == "disk" and server["builds_stage"] and server["needs"] == []
    assert server["outputs"] == ["server.raw", "server.qcow2", "server.manifest.json"]
    assert server["shares_stage_with"] == DISK_IMAGES[1:]
    for name in DISK_IMAGES[1:]:
        assert entries[name]["stage_key"] == server["stage_key"]
        assert not entries[name]["builds_stage"] and entries[name]["needs"] == ["server"]
    container = entries["container"]
    assert container["stage_key"] != server["stage_key"]
    assert container["builds_stage"] and container["shares_stage_with"] == []
    assert container["outputs"] == [
        "container.oci.tar",
        "container.rootfs.tar",
        "container.manifest.json",
    ]


def test_named_images_plan_only_those() -> None:
    data = json.loads(plan("server-btrfs", "legacy"))
    assert [(e["name"], e["builds_stage"], e["needs"]) for e in data["images"]] == [
        ("server-btrfs", True, []),
        ("legacy", False, ["server-btrfs"]),
    ]


def test_gitlab_child_pipeline_has_what_gitlab_requires() -> None:
    pipeline = parse_yaml(plan("--all", "--format", "gitlab", "--job-template", "ci/job.yml"))
    assert isinstance(pipeline, dict)
    assert pipeline["include"] == [{"local": "ci/job.yml"}]
    stages = pipeline["stages"]
    assert isinstance(stages, list) and all(isinstance(s, str) for s in stages)
    jobs = {name: job for name, job in pipeline.items() if name not in GITLAB_KEYWORDS}
    assert sorted(jobs) == sorted(f"build:{n}" for n in [*DISK_IMAGES, *OWN_STAGE])
    for name, job in jobs.items():
        assert not name.startswith("."), "a hidden job never runs"
        assert job["extends"] == ".imagesmith-build"
        assert job["stage"] in stages
        script = job["script"]
        assert isinstance(script, list) and script and all(isinstance(s, str) for s in script)
        image = name.removeprefix("build:")
        assert script == [f"imagesmith build -C {EXAMPLES} -o out {image}"]
        assert all(isinstance(p, str) for p in job["artifacts"]["paths"])
        assert isinstance(job["needs"], list)
        for need in job["needs"]:
            # needs: a job of this pipeline in an earlier stage
            assert set(need) <= {"job", "artifacts", "optional"} and need["job"] in jobs
            needed = jobs[need["job"]]
            assert stages.index(needed["stage"]) < stages.index(job["stage"])
    for name in DISK_IMAGES[1:]:
        assert jobs[f"build:{name}"]["needs"] == [{"job": "build:server", "artifacts": False}]
    assert jobs["build:server"]["needs"] == [] and jobs["build:container"]["needs"] == []


def test_github_matrix_has_what_fromjson_and_strategy_need() -> None:
    text = plan("--all", "--format", "github")
    assert "\n" not in text.strip(), "one line, for $GITHUB_OUTPUT"
    data = json.loads(text)
    assert set(data) == {"first", "then"}
    for matrix in data.values():
        assert set(matrix) == {"include"}
        assert isinstance(matrix["include"], list) and matrix["include"]
        for row in matrix["include"]:
            assert isinstance(row, dict)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in row.items())
            assert {"image", "target", "outputs", "stage_key", "needs"} <= set(row)
    first = [r["image"] for r in data["first"]["include"]]
    assert first == ["server", *OWN_STAGE]
    assert [r["image"] for r in data["then"]["include"]] == DISK_IMAGES[1:]
    assert all(r["needs"] in first for r in data["then"]["include"])


def test_unknown_image_is_a_config_error() -> None:
    result = imagesmith("plan", "-C", EXAMPLES, "no-such-image")
    assert result.returncode == 2 and "no-such-image" in result.stderr
