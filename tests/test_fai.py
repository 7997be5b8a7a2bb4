"""FAI import: class order, .var sourcing with ifclass, package_config,
fcopy with file-modes, disk_config mapping. Plain unit tests, no build."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imagesmith.errors import ConfigError
from imagesmith.fai.classes import FAI_DATA, resolve_fai_classes, unique_classes
from imagesmith.fai.diskconfig import map_disk_config
from imagesmith.fai.packages import class_expression_true, read_package_config

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the class sandbox needs root")


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def fai_space(tmp_path: Path) -> Path:
    space = tmp_path / "fai"
    write(space / "class/01-classes", "#!/bin/bash\necho $cmdlineclasses\n", 0o755)
    write(space / "class/20-more", "#!/bin/bash\nifclass A && echo FROM_A\necho B\n", 0o755)
    write(space / "class/30-src.sh", "newclasses=SOURCED\n", 0o755)
    write(space / "class/40-off", "#!/bin/bash\necho NEVER\n", 0o644)
    write(space / "class/myhost", "# a host file\nHOSTFILE\n")
    write(space / "class/A.var", "x=one\nif ifclass B; then y=b; fi\nif ifclass Z; then z=1; fi\n")
    write(space / "class/LAST.var", "x=last\ntouch /etc/fai-sandbox-escape 2>/dev/null\n")
    return space


@needs_root
def test_classes_in_fai_order_with_new(fai_space: Path) -> None:
    result = resolve_fai_classes(fai_space, ["A", "C"], renew=True, hostname="myhost")
    assert result.classes == (
        "DEFAULT", "A", "C", "FROM_A", "B", "SOURCED", "HOSTFILE", "myhost", "LAST",
    )  # fmt: skip
    variables = dict(result.variables)
    assert variables["x"] == "last"  # LAST.var sourced after A.var
    assert variables["y"] == "b"  # ifclass saw B, defined by a class script
    assert "z" not in variables
    assert not Path("/etc/fai-sandbox-escape").exists()


@needs_root
def test_classes_without_new_are_the_command_line(fai_space: Path) -> None:
    result = resolve_fai_classes(fai_space, ["A", "B"], renew=False, hostname="h")
    assert result.classes == ("A", "B")
    assert dict(result.variables)["y"] == "b"


def test_duplicate_classes_keep_their_last_place() -> None:
    assert unique_classes(["DEFAULT", "A", "B", "A", "LAST"]) == (
        ["DEFAULT", "B", "A", "LAST"], ["A"],
    )  # fmt: skip


def test_ifclass_helper() -> None:
    env = {"classes": "A B-C", "PATH": os.environ["PATH"]}

    def ifclass(*args: str) -> int:
        return subprocess.run([FAI_DATA / "ifclass", *args], env=env).returncode

    assert ifclass("A") == 0
    assert ifclass("A && !B-C") == 1
    assert ifclass("-o", "X", "B-C") == 0
    assert ifclass("-a", "A", "X") == 1
    assert ifclass("(X || A) && B-C") == 0


PACKAGE_CONFIG = """\
PACKAGES install-norec
less vim- ${editor} memtest86+
PACKAGES install A B
fromab bash/bookworm-backports curl=8.0
PACKAGES install NOPE
never
PACKAGES install A && !B
never2
PACKAGES install (A || NOPE) && !NOPE
fromexpr # a comment
PACKAGES remove
nano apt+
PACKAGES install release=trixie-backports
newer
PACKAGES taskinst
ssh-server
PACKAGES aptitude
viaaptitude
PACKAGES hold
held
"""


def test_package_config_all_constructs(tmp_path: Path) -> None:
    path = write(tmp_path / "X", PACKAGE_CONFIG)
    out = read_package_config(path, "package_config/X", {"A", "B"}, {"editor": "emacs"})
    assert out.install == [
        "less", "emacs", "memtest86+", "fromab", "bash/bookworm-backports", "curl=8.0",
        "fromexpr", "apt", "newer/trixie-backports", "task-ssh-server", "viaaptitude",
    ]  # fmt: skip
    assert out.remove == ["vim", "nano"]
    assert [n.line() for n in out.notes] == ["package_config/X:19: PACKAGES hold: not carried over"]


def test_package_config_drops_unknown_packages(tmp_path: Path) -> None:
    path = write(tmp_path / "X", "PACKAGES install\nless nosuchpkg memtest86+ vim-\n")
    known = {"less", "memtest86+", "vim"}
    out = read_package_config(path, "package_config/X", set(), {}, known)
    assert out.install == ["less", "memtest86+"]
    assert out.remove == ["vim"]
    assert [n.construct for n in out.notes] == ["unknown package nosuchpkg"]


def test_package_config_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "X", "less\n")
    with pytest.raises(ConfigError, match="package_config/X:1"):
        read_package_config(path, "package_config/X", set(), {})
    path = write(tmp_path / "Y", "# x\nPACKAGES instal\n")
    with pytest.raises(ConfigError, match="package_config/Y:2: unknown action"):
        read_package_config(path, "package_config/Y", set(), {})


def test_class_expressions() -> None:
    assert class_expression_true("UBUNTU && !XORG", {"UBUNTU"})
    assert not class_expression_true("UBUNTU && ! XORG", {"UBUNTU", "XORG"})
    assert class_expression_true("!(A || B) || C", {"C"})
    with pytest.raises(ValueError):
        class_expression_true("A &&", {"A"})


def test_fcopy_last_class_wins_with_file_modes(tmp_path: Path) -> None:
    files, target = tmp_path / "fai/files", tmp_path / "target"
    write(files / "etc/motd/A", "from A\n")
    write(files / "etc/motd/B", "from B\n")
    write(files / "etc/motd/file-modes", "0 0 0600 B\n0 0 0644\n")
    write(files / "etc/issue/A", "issue A\n", 0o640)
    write(files / "etc/issue/postinst", '#!/bin/sh\necho "$1" > "$2.post"\n', 0o755)
    write(files / "root/dot/.bashrc/A", "rc\n")
    write(target / "etc/motd", "old\n")
    env = {
        "FAI": str(tmp_path / "fai"), "target": str(target), "classes": "A B C",
        "PATH": os.environ["PATH"],
    }  # fmt: skip
    fcopy = [FAI_DATA / "fcopy"]
    subprocess.run([*fcopy, "/etc/motd", "/etc/issue"], env=env, check=True)
    assert (target / "etc/motd").read_text() == "from B\n"
    assert (target / "etc/motd").stat().st_mode & 0o777 == 0o600
    assert (target / "etc/motd.pre_fcopy").read_text() == "old\n"
    assert (target / "etc/issue").stat().st_mode & 0o777 == 0o640
    assert (target / "etc/issue.post").read_text() == "A\n"
    subprocess.run([*fcopy, "-M", "-r", "/root"], env=env, check=True)
    assert (target / "root/dot/.bashrc").stat().st_mode & 0o777 == 0o644
    assert subprocess.run([*fcopy, "/etc/none"], env=env).returncode == 1
    assert subprocess.run([*fcopy, "-i", "/etc/none"], env=env).returncode == 0


def test_ainsl_like_fai(tmp_path: Path) -> None:
    env = {"AINSL_TARGET": str(tmp_path), "PATH": os.environ["PATH"]}
    ainsl = [FAI_DATA / "ainsl"]
    subprocess.run([*ainsl, "-a", "/etc/modules", "^usbhid$"], env=env, check=True)
    subprocess.run([*ainsl, "-a", "/etc/modules", "^usbhid$"], env=env, check=True)
    subprocess.run([*ainsl, "-s", "/etc/modules", "a  b"], env=env, check=True)
    assert (tmp_path / "etc/modules").read_text() == "usbhid\na  b\n"
    assert subprocess.run([*ainsl, "/etc/none", "x"], env=env).returncode != 0


DISK_CONFIG = """\
# example
disk_config disk1 disklabel:msdos bootable:1 fstabkey:uuid
primary /boot/efi 512M- vfat rw
primary / 2G-50G btrfs rw,noatime
primary swap 200-1G swap sw
logical /home 100- ext4 rw
"""


def test_disk_config_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "FAIBASE", DISK_CONFIG)
    mapping = map_disk_config(path, "disk_config/FAIBASE")
    assert mapping.settings == {"esp_size": "512MiB", "filesystem": "btrfs"}
    assert [n.construct for n in mapping.notes] == [
        "disklabel:msdos", "bootable:1", "fstabkey:uuid",
        "root mount options rw,noatime", "swap", "partition /home (ext4)",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["disk_config lvm\nvg vg1 disk1.2\n", "disk_config raid\nraid1 / disk1.1 ext4 rw\n",
     "disk_config cryptsetup\n", "disk_config disk1\nprimary / 2G luks:\"x\" rw\n"],
)  # fmt: skip
def test_disk_config_rejects_lvm_raid_luks(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "LVM", text)
    with pytest.raises(ConfigError, match=r"disk_config/LVM:\d"):
        map_disk_config(path, "disk_config/LVM")


def test_fai_files_the_importer_copies_must_stay_in_the_space(tmp_path: Path) -> None:
    """A debconf file, .deb or key that is a symlink to a host file would put
    the host's content into the new config space, and from there the image."""
    from imagesmith.config.tomlfile import inside_space

    space = tmp_path / "fai"
    (space / "debconf").mkdir(parents=True)
    host = tmp_path / "host-secret"
    host.write_text("root:$1$x$y:1::::::\n")
    (space / "debconf/DEMO").symlink_to(host)
    with pytest.raises(ConfigError, match="leads out of the config space"):
        inside_space(space, space / "debconf/DEMO", "a debconf file")
