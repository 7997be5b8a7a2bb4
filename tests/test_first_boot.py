"""First boot on a fleet machine: growth to the disk and an identity of its own.

Everything is read from inside booted guests: tests/checks/first-boot prints
facts (sizes, the root's UUID, machine-id, SSH host key fingerprints, this
boot's growth and UUID log lines) and `imagesmith test --report` brings them
out. The example images come from the session fixture; four boots in all:

- btrfs machine A: a copy enlarged by 2 GiB, booted twice in place;
- btrfs machine B: another copy at the image's own size, so nothing to grow;
- ext4 machine C: a copy enlarged by 2 GiB.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, imagesmith

pytestmark = [pytest.mark.build, pytest.mark.boot]
CHECKS = REPO / "tests" / "checks" / "first-boot"
GiB = 1024**3
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
# Under TCG, with other builds sharing two cores, a boot has taken 200 s.
BOOT_TIMEOUT = 900


@dataclass
class Boot:
    """What one boot reported from inside the guest."""

    facts: dict[str, list[str]]
    stdout: str

    def one(self, key: str) -> str:
        values = self.facts.get(key, [])
        assert len(values) == 1, f"{key}: {values}\n{self.stdout}"
        return values[0]

    def number(self, key: str) -> int:
        return int(self.one(key))

    def log(self, key: str) -> str:
        return "\n".join(self.facts.get(key, []))


def boot(image: Path, report: Path, *, in_place: bool = False) -> Boot:
    args = ["test", image, "--checks", CHECKS, "--report", report, "--timeout", str(BOOT_TIMEOUT)]
    if in_place:
        args.append("--in-place")
    result = imagesmith(*args, timeout=BOOT_TIMEOUT + 60)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert all(c["passed"] for c in checks.values()), result.stdout
    facts: dict[str, list[str]] = {}
    for line in checks["50-first-boot-facts"]["output"]:
        key, sep, value = line.partition("=")
        if sep:
            facts.setdefault(key, []).append(value)
    return Boot(facts, result.stdout)


def copy_image(source: Path, target: Path, *, grow_by: int = 0) -> Path:
    subprocess.run(["cp", "--sparse=always", source, target], check=True)
    if grow_by:
        with target.open("r+b") as f:
            f.truncate(source.stat().st_size + grow_by)
    return target


def manifest_root(built: Path, image: str) -> dict[str, object]:
    manifest = json.loads((built / f"{image}.manifest.json").read_text())
    root: dict[str, object] = manifest["disk"]["partitions"][-1]
    return root


def partitions(image: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        ["sfdisk", "-J", str(image)], capture_output=True, text=True, check=True
    )
    assert "GPT" not in result.stderr, result.stderr  # e.g. a backup GPT not at the end
    table = json.loads(result.stdout)["partitiontable"]
    parts: list[dict[str, object]] = table["partitions"]
    return parts


def assert_root_fills_the_disk(machine: Boot, disk_size: int) -> None:
    assert machine.number("disk_size") == disk_size
    usable = disk_size - machine.number("esp_size")
    fs_size = machine.number("fs_size")
    assert abs(fs_size - usable) <= 0.02 * usable, (fs_size, usable, machine.log("grow_log"))
    assert fs_size <= machine.number("part_size")


@pytest.fixture(scope="module")
def btrfs_machines(
    built_examples: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Boot]:
    work = tmp_path_factory.mktemp("first-boot-btrfs")
    image = built_examples / "server-btrfs.raw"
    a = copy_image(image, work / "a.raw", grow_by=2 * GiB)
    b = copy_image(image, work / "b.raw")
    machines = {
        "a1": boot(a, work / "a1.json", in_place=True),
        "a2": boot(a, work / "a2.json", in_place=True),
        "b": boot(b, work / "b.json"),
    }
    machines["a-table"] = Boot({"partitions": [json.dumps(p) for p in partitions(a)]}, "")
    return machines


def test_btrfs_root_grows_to_an_enlarged_disk(
    built_examples: Path, btrfs_machines: dict[str, Boot]
) -> None:
    a1 = btrfs_machines["a1"]
    assert a1.one("fstype") == "btrfs"
    disk_size = (built_examples / "server-btrfs.raw").stat().st_size + 2 * GiB
    assert_root_fills_the_disk(a1, disk_size)
    built = manifest_root(built_examples, "server-btrfs")
    assert a1.number("part_size") > int(str(built["size"])) + GiB
    # The root partition itself grew: no second root partition in the free space.
    assert "Growing existing partition 1." in a1.log("grow_log"), a1.log("grow_log")
    assert "Adding new partition" not in a1.log("grow_log")
    # As the host sees the disk after both boots: still two partitions, and
    # the backup GPT moved to the end (sfdisk would complain otherwise).
    table = [json.loads(p) for p in btrfs_machines["a-table"].facts["partitions"]]
    assert [p["type"] for p in table] == [ESP_TYPE, ROOT_X86_64]
    root_end = (int(table[1]["start"]) + int(table[1]["size"])) * 512
    assert disk_size - 64 * 1024 < root_end <= disk_size


def test_btrfs_fsid_is_new_on_first_boot(
    built_examples: Path, btrfs_machines: dict[str, Boot]
) -> None:
    a1 = btrfs_machines["a1"]
    built_uuid = manifest_root(built_examples, "server-btrfs")["fs_uuid"]
    assert a1.one("fs_uuid") != built_uuid
    assert f"new UUID {a1.one('fs_uuid')} (was {built_uuid})" in a1.log("fs_uuid_log")
    assert len(a1.one("machine_id")) == 32
    assert len(a1.facts.get("ssh_host_key", [])) >= 2, a1.stdout


def test_second_boot_keeps_identity_and_grows_nothing(btrfs_machines: dict[str, Boot]) -> None:
    a1, a2 = btrfs_machines["a1"], btrfs_machines["a2"]
    for key in ("fs_uuid", "machine_id", "fs_size", "part_size", "disk_size"):
        assert a2.one(key) == a1.one(key), key
    assert sorted(a2.facts["ssh_host_key"]) == sorted(a1.facts["ssh_host_key"])
    assert "has its own UUID" in a2.log("fs_uuid_log")
    assert "new UUID" not in a2.log("fs_uuid_log")
    assert "Growing existing partition" not in a2.log("grow_log")
    assert "Applying changes" not in a2.log("grow_log"), a2.log("grow_log")


def test_two_machines_from_one_image_differ(
    built_examples: Path, btrfs_machines: dict[str, Boot]
) -> None:
    a, b = btrfs_machines["a1"], btrfs_machines["b"]
    assert a.one("machine_id") != b.one("machine_id")
    assert a.one("fs_uuid") != b.one("fs_uuid")
    assert b.one("fs_uuid") != manifest_root(built_examples, "server-btrfs")["fs_uuid"]
    assert not set(a.facts["ssh_host_key"]) & set(b.facts["ssh_host_key"])


def test_disk_of_the_image_size_has_nothing_to_grow(
    built_examples: Path, btrfs_machines: dict[str, Boot]
) -> None:
    b = btrfs_machines["b"]
    assert_root_fills_the_disk(b, (built_examples / "server-btrfs.raw").stat().st_size)
    assert b.number("part_size") == manifest_root(built_examples, "server-btrfs")["size"]
    assert "Applying changes" not in b.log("grow_log"), b.log("grow_log")


def test_ext4_root_grows_and_gets_a_new_uuid(built_examples: Path, tmp_path: Path) -> None:
    image = built_examples / "server.raw"
    c = boot(copy_image(image, tmp_path / "c.raw", grow_by=2 * GiB), tmp_path / "c.json")
    assert c.one("fstype") == "ext4"
    assert_root_fills_the_disk(c, image.stat().st_size + 2 * GiB)
    assert "Growing existing partition 1." in c.log("grow_log"), c.log("grow_log")
    built_uuid = manifest_root(built_examples, "server")["fs_uuid"]
    assert c.one("fs_uuid") != built_uuid
    assert f"new UUID {c.one('fs_uuid')} (was {built_uuid})" in c.log("fs_uuid_log")


def test_image_ships_no_identity(built_examples: Path) -> None:
    """No machine-id and no SSH host keys in the image; the UUID the initramfs compares with."""
    root = manifest_root(built_examples, "server")
    # e2fsprogs opens a filesystem at an offset in a file as FILE?offset=BYTES.
    fs = f"{built_examples / 'server.raw'}?offset={root['start']}"

    def debugfs(request: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", request, fs], capture_output=True, text=True, check=True
        ).stdout

    assert debugfs("cat /etc/machine-id") == ""
    assert "sshd_config" in debugfs("ls /etc/ssh")
    assert "ssh_host_" not in debugfs("ls /etc/ssh")
    grub_cfg = debugfs("cat /boot/grub/grub.cfg")
    assert f" imagesmith.image_fs_uuid={root['fs_uuid']} " in grub_cfg
