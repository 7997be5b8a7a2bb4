"""Unit tests for the build's side of first boot: the switches that add the
built-in classes, the first-boot stage on a tree, per-build UUIDs, and the
check report that brings values out of the guest. The boots are in
test_first_boot.py."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from imagesmith.build import plan_image_layout
from imagesmith.config.classes import BUILTIN_CLASSES, add_switched_classes
from imagesmith.config.space import ResolvedImage, load_config_space, resolve_image
from imagesmith.context import BuildContext
from imagesmith.errors import ConfigError
from imagesmith.inspect import vmtest as qemu
from imagesmith.inspect.summary import summary_lines
from imagesmith.stages.finalize import strip_build_state
from imagesmith.tree.firstboot import first_boot_cmdline

SWITCHED = ["grow-root", "new-fs-uuid", "new-ssh-host-keys"]


def resolve(
    tmp_path: Path, image: str = "", classes: dict[str, str] | None = None, *, listed: str = ""
) -> ResolvedImage:
    space = tmp_path / "space"
    space.mkdir(exist_ok=True)
    listed = listed or '["base", "uefi", "mine"]'
    (space / "imagesmith.toml").write_text(
        f"[images.vm]\nclasses = {listed}\n" + textwrap.dedent(image)
    )
    for name, text in {"mine": "", **(classes or {})}.items():
        folder = space / "classes" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "class.toml").write_text(textwrap.dedent(text))
    return resolve_image(load_config_space(space), "vm")


# --- switches add built-in classes ---------------------------------------------


def test_switched_classes_go_right_after_base() -> None:
    assert add_switched_classes(["base", "uefi", "mine"], SWITCHED) == [
        "base", *SWITCHED, "uefi", "mine",
    ]  # fmt: skip
    assert add_switched_classes(["mine"], ["grow-root"]) == ["grow-root", "mine"]
    # A class the image lists keeps its place and is not added twice.
    assert add_switched_classes(["base", "mine", "grow-root"], ["grow-root"]) == [
        "base", "mine", "grow-root",
    ]  # fmt: skip


def test_first_boot_classes_are_on_by_default(tmp_path: Path) -> None:
    image = resolve(tmp_path)
    assert image.class_names == ("base", *SWITCHED, "uefi", "mine")
    assert [c.switched_by for c in image.classes[1:4]] == [
        "grow_root", "new_fs_uuid", "new_ssh_host_keys",
    ]  # fmt: skip
    assert all(c.builtin for c in image.classes[1:4])
    assert "systemd-repart" in image.packages
    assert (BUILTIN_CLASSES / "grow-root/files/etc/repart.d/50-root.conf").is_file()


@pytest.mark.parametrize(
    ("setting", "cls"),
    [("grow_root", "grow-root"), ("new_fs_uuid", "new-fs-uuid"),
     ("new_ssh_host_keys", "new-ssh-host-keys")],
)  # fmt: skip
def test_one_switch_turns_each_class_off(tmp_path: Path, setting: str, cls: str) -> None:
    image = resolve(tmp_path, f"{setting} = false\n")
    assert cls not in image.class_names
    assert getattr(image.settings, setting) is False
    assert len([c for c in image.classes if c.switched_by]) == 2


def test_switch_can_be_turned_off_by_a_class(tmp_path: Path) -> None:
    image = resolve(tmp_path, classes={"mine": "[settings]\ngrow_root = false\n"})
    assert "grow-root" not in image.class_names
    assert "systemd-repart" not in image.packages


def test_config_space_class_replaces_a_switched_builtin(tmp_path: Path) -> None:
    image = resolve(
        tmp_path, classes={"grow-root": '[packages]\ninstall = ["cloud-guest-utils"]\n'}
    )
    [grow] = [c for c in image.classes if c.name == "grow-root"]
    assert not grow.builtin and grow.switched_by == "grow_root"
    assert "cloud-guest-utils" in image.packages
    assert "systemd-repart" not in image.packages


def test_config_space_class_extends_a_switched_builtin(tmp_path: Path) -> None:
    image = resolve(tmp_path, classes={"new-fs-uuid": "extend = true\n"})
    [cls] = [c for c in image.classes if c.name == "new-fs-uuid"]
    assert cls.extends is not None and cls.extends.builtin


def test_listing_a_class_whose_switch_is_off_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(tmp_path, "grow_root = false\n", listed='["base", "grow-root"]')
    assert "class 'grow-root' is listed but grow_root = false" in e.value.message
    assert e.value.hint


def test_switched_class_may_not_turn_its_own_switch_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(tmp_path, classes={"grow-root": "[settings]\ngrow_root = false\n"})
    assert "grow_root" in e.value.message


def test_summary_shows_the_switches_and_the_classes_they_add(tmp_path: Path) -> None:
    text = "\n".join(summary_lines(resolve(tmp_path, "new_ssh_host_keys = false\n")))
    assert re.search(r"grow-root +disk +built-in \(added by grow_root = true\)", text), text
    assert "new-ssh-host-keys" not in text.split("settings:")[0]
    assert "new_ssh_host_keys  false" in text
    assert "grow_root          true" in text


# --- per-build UUIDs -------------------------------------------------------------


def layout_uuids(image: ResolvedImage, seed: str = "") -> list[str]:
    layout = plan_image_layout(image, uuid_seed=seed)
    return [layout.disk_uuid] + [u for p in layout.partitions for u in (p.uuid, p.fs_uuid)]


def test_every_build_gets_new_uuids(tmp_path: Path) -> None:
    image = resolve(tmp_path)
    first, second = layout_uuids(image), layout_uuids(image)
    assert not set(first) & set(second)


def test_uuid_seed_setting_makes_them_reproducible(tmp_path: Path) -> None:
    image = resolve(tmp_path, 'uuid_seed = "release-1"\n')
    assert layout_uuids(image) == layout_uuids(image)
    assert len(set(layout_uuids(image))) == 5
    # The command line's seed wins over the setting.
    assert layout_uuids(image, "other") != layout_uuids(image)
    assert layout_uuids(image, "other") == layout_uuids(resolve(tmp_path), "other")


# --- the first-boot stage on a tree --------------------------------------------


def stage_context(tmp_path: Path, image_settings: str = "") -> BuildContext:
    image = resolve(tmp_path, image_settings)
    ctx = BuildContext(
        image=image,
        workdir=tmp_path / "work",
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        layout=plan_image_layout(image),
    )
    ssh = ctx.tree / "etc/ssh"
    ssh.mkdir(parents=True)
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "sshd_config"):
        (ssh / name).write_text("x")
    return ctx


def test_build_removes_host_keys_and_passes_on_the_built_fs_uuid(tmp_path: Path) -> None:
    ctx = stage_context(tmp_path)
    strip_build_state(ctx)
    assert sorted(p.name for p in (ctx.tree / "etc/ssh").iterdir()) == ["sshd_config"]
    assert first_boot_cmdline(ctx.image.settings, ctx.layout) == [
        f"imagesmith.image_fs_uuid={ctx.layout.root.fs_uuid}"
    ]


def test_build_keeps_what_the_switches_say_to_keep(tmp_path: Path) -> None:
    ctx = stage_context(tmp_path, "new_ssh_host_keys = false\nnew_fs_uuid = false\n")
    strip_build_state(ctx)
    assert len(list((ctx.tree / "etc/ssh").iterdir())) == 3
    assert first_boot_cmdline(ctx.image.settings, ctx.layout) == []


# --- check output from the guest ------------------------------------------------


def test_parse_checks_keeps_each_checks_output() -> None:
    report = "\n".join(
        [
            "noise",
            "IMAGESMITH-CHECK n1 PASS facts",
            "  | machine_id=abc",
            "  |",
            "  | fs_uuid=def\r",
            "IMAGESMITH-CHECK other PASS not-ours",
            "IMAGESMITH-CHECK n1 FAIL broken",
            "  | why",
            "IMAGESMITH-RESULT n1 FAIL",
        ]
    )
    checks = qemu.parse_checks(report, "n1")
    assert [(c.name, c.passed) for c in checks] == [("facts", True), ("broken", False)]
    assert checks[0].output == ["machine_id=abc", "", "fs_uuid=def"]
    assert checks[1].output == ["why"]


def test_report_is_json_with_every_checks_output(tmp_path: Path) -> None:
    result = qemu.TestResult(
        image=Path("x.raw"),
        passed=False,
        reason="checks failed in the guest",
        checks=[qemu.CheckResult("a", True, ["one"]), qemu.CheckResult("b", False, ["two"])],
    )
    qemu.write_report(result, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False
    assert data["checks"] == [
        {"name": "a", "passed": True, "output": ["one"]},
        {"name": "b", "passed": False, "output": ["two"]},
    ]
    # The summary shows the output of failed checks only.
    assert "| two" in result.summary() and "| one" not in result.summary()
