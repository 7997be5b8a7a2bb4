"""Unit tests for class discovery, validation and the merge rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagesmith.config.classes import (
    BUILTIN_CLASSES,
    ClassDef,
    find_class,
    load_class,
    merge_classes,
)
from imagesmith.errors import ConfigError


def write(path: Path, text: str, *, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    path.chmod(mode)
    return path


def make_class(space: Path, name: str, class_toml: str = "", **files: str) -> Path:
    """classes/NAME/ with a class.toml and extra files (keyword: relative path)."""
    folder = space / "classes" / name
    folder.mkdir(parents=True, exist_ok=True)
    if class_toml:
        write(folder / "class.toml", class_toml)
    for relative, text in files.items():
        write(folder / relative, text)
    return folder


def user_class(name: str, **fields: object) -> ClassDef:
    return ClassDef(name=name, path=Path("/nowhere") / name, builtin=False, **fields)  # type: ignore[arg-type]


def find(space: Path, name: str) -> ClassDef:
    return find_class(space, name, where="imagesmith.toml:2")


def load_error(folder: Path) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_class(folder, builtin=False)
    assert e.value.exit_code == 2
    return e.value


# --- merge rules ---------------------------------------------------------------


def test_package_sets_merge_in_class_order() -> None:
    merged = merge_classes(
        (
            user_class("a", install=("less", "vim")),
            user_class("b", install=("curl", "less")),
        )
    )
    assert merged.packages == ("less", "vim", "curl")
    assert merged.remove_packages == ()


def test_later_remove_drops_an_earlier_install() -> None:
    merged = merge_classes(
        (
            user_class("a", install=("less", "nano", "vim")),
            user_class("b", remove=("nano",)),
        )
    )
    assert merged.packages == ("less", "vim")
    assert merged.remove_packages == ("nano",)


def test_later_install_re_adds_a_removed_package() -> None:
    merged = merge_classes(
        (
            user_class("a", install=("nano",)),
            user_class("b", remove=("nano",)),
            user_class("c", install=("nano",)),
        )
    )
    assert merged.packages == ("nano",)
    assert merged.remove_packages == ()


def test_remove_matches_by_package_name_not_spec() -> None:
    merged = merge_classes(
        (
            user_class("a", install=("libc6:amd64", "curl=8.0-1", "vim/trixie-backports")),
            user_class("b", remove=("libc6", "vim")),
        )
    )
    assert merged.packages == ("curl=8.0-1",)
    assert merged.remove_packages == ("libc6", "vim")


def test_later_spec_of_the_same_package_replaces_the_earlier() -> None:
    merged = merge_classes(
        (
            user_class("a", install=("curl", "less")),
            user_class("b", install=("curl/trixie-backports",)),
        )
    )
    assert merged.packages == ("curl/trixie-backports", "less")


def test_repository_with_the_same_name_is_replaced() -> None:
    first = {"name": "vendor", "uri": "http://one.example/debian", "source": "a"}
    other = {"name": "other", "uri": "http://other.example/debian", "source": "a"}
    second = {"name": "vendor", "uri": "http://two.example/debian", "source": "b"}
    merged = merge_classes(
        (
            user_class("a", repositories=(first, other)),
            user_class("b", repositories=(second,)),
        )
    )
    assert [r["uri"] for r in merged.repositories] == [
        "http://two.example/debian",
        "http://other.example/debian",
    ]


def test_debconf_is_concatenated_in_class_order() -> None:
    merged = merge_classes(
        (
            user_class("a", debconf="tzdata tzdata/Areas select Etc"),
            user_class("b"),
            user_class("c", debconf="locales locales/default select C.UTF-8\n\n"),
        )
    )
    assert merged.debconf == (
        "tzdata tzdata/Areas select Etc\nlocales locales/default select C.UTF-8\n"
    )


def test_settings_layers_follow_class_order() -> None:
    merged = merge_classes(
        (user_class("a", settings={"hostname": "a"}), user_class("b", settings={"hostname": "b"}))
    )
    assert merged.settings_layers == ({"hostname": "a"}, {"hostname": "b"})


# --- built-in classes and overriding them -----------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in BUILTIN_CLASSES.iterdir()))
def test_builtin_classes_load_cleanly(name: str) -> None:
    cls = load_class(BUILTIN_CLASSES / name, builtin=True)
    assert cls.builtin
    assert cls.description
    # Every built-in class does something: packages, settings, files or scripts.
    assert cls.install or cls.settings or cls.files_dir or cls.scripts


def test_builtin_classes_are_base_and_uefi(tmp_path: Path) -> None:
    assert {"base", "uefi"} <= {p.name for p in BUILTIN_CLASSES.iterdir()}
    assert "linux-image-amd64" in find(tmp_path, "base").install
    assert "grub-efi-amd64-bin" in find(tmp_path, "uefi").install
    assert find(tmp_path, "base").files_dir == BUILTIN_CLASSES / "base/files"


def test_config_space_class_overrides_the_builtin(tmp_path: Path) -> None:
    make_class(tmp_path, "base", '[packages]\ninstall = ["busybox"]\n')
    cls = find(tmp_path, "base")
    assert not cls.builtin
    assert cls.extends is None
    assert cls.layers() == (cls,)
    assert merge_classes((cls,)).packages == ("busybox",)


def test_extend_applies_the_builtin_first(tmp_path: Path) -> None:
    make_class(
        tmp_path,
        "base",
        """
        extend = true
        [packages]
        install = ["busybox"]
        remove = ["login"]
        [settings]
        hostname = "extended"
        """,
    )
    cls = find(tmp_path, "base")
    builtin, own = cls.layers()
    assert (builtin.builtin, builtin.path) == (True, BUILTIN_CLASSES / "base")
    assert own is cls
    merged = merge_classes((cls,))
    assert merged.packages[0] == "systemd-sysv"
    assert merged.packages[-1] == "busybox"
    assert "linux-image-amd64" in merged.packages
    assert "login" not in merged.packages
    assert merged.settings_layers == ({}, {"hostname": "extended"})


def test_extend_without_a_builtin_is_an_error(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "mine", "extend = true\n")
    with pytest.raises(ConfigError) as e:
        find(tmp_path, "mine")
    assert e.value.message.startswith(f"{folder / 'class.toml'}: ")
    assert "no built-in class 'mine'" in e.value.message


def test_class_folder_may_hold_only_documented_entries(tmp_path: Path) -> None:
    folder = make_class(
        tmp_path,
        "full",
        'description = "everything"\n',
        **{
            "files/etc/motd": "hi\n",
            "fcopy/etc/issue": "hi\n",
            "debconf": "tzdata tzdata/Areas select Etc\n",
            "README.md": "docs\n",
            "README": "docs\n",
            ".gitignore": "*~\n",
        },
    )
    write(folder / "scripts/20-second", "#!/bin/sh\n", mode=0o755)
    write(folder / "scripts/10-first", "#!/bin/sh\n", mode=0o755)
    write(folder / "scripts/.keep", "")
    cls = load_class(folder, builtin=False)
    assert cls.description == "everything"
    assert cls.debconf == "tzdata tzdata/Areas select Etc\n"
    assert [s.name for s in cls.scripts] == ["10-first", "20-second"]
    assert cls.files_dir == folder / "files"
    assert cls.fcopy_dir == folder / "fcopy"


def test_class_without_class_toml_is_empty(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "bare", **{"files/etc/motd": "hi\n"})
    cls = load_class(folder, builtin=False)
    assert (cls.install, cls.remove, cls.settings, cls.fcopy_dir) == ((), (), {}, None)


# --- validation ---------------------------------------------------------------


def test_unknown_entry_in_class_folder_names_the_path(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "typo", "", **{"script/10-x": "#!/bin/sh\n"})
    error = load_error(folder)
    assert error.message == f"{folder / 'script'}: unknown entry in class 'typo'"
    assert "scripts" in error.hint


def test_non_executable_script_names_the_path(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "s")
    script = write(folder / "scripts/10-setup", "#!/bin/sh\n", mode=0o644)
    error = load_error(folder)
    assert error.message == f"{script}: class scripts must be executable files"
    assert error.hint == f"chmod +x {script}"


def test_directory_in_scripts_is_an_error(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "s")
    (folder / "scripts/10-dir").mkdir(parents=True)
    error = load_error(folder)
    assert error.message.startswith(f"{folder / 'scripts/10-dir'}: ")


@pytest.mark.parametrize("bad", ["Vim", "a", "foo bar", "-foo", "foo=", "foo:"])
def test_bad_package_name_names_file_line_and_name(tmp_path: Path, bad: str) -> None:
    folder = make_class(
        tmp_path,
        "p",
        f"""
        description = "p"

        [packages]
        install = ["less", "{bad}"]
        """,
    )
    error = load_error(folder)
    assert error.message == (
        f"{folder / 'class.toml'}:4: {bad!r} is not a valid Debian package name"
    )


@pytest.mark.parametrize(
    "good", ["g++", "libc6:amd64", "curl=8.14.1-2+deb13u1", "vim/trixie-backports", "0ad"]
)
def test_valid_package_specs_are_accepted(tmp_path: Path, good: str) -> None:
    folder = make_class(tmp_path, "p", f'[packages]\nremove = ["{good}"]\n')
    assert load_class(folder, builtin=False).remove == (good,)


def test_unknown_packages_key_names_file_line_and_key(tmp_path: Path) -> None:
    folder = make_class(
        tmp_path,
        "p",
        """
        [packages]
        install = ["less"]
        purge = ["nano"]
        """,
    )
    error = load_error(folder)
    assert error.message == f"{folder / 'class.toml'}:3: unknown key 'purge' in [packages]"
    assert "install" in error.hint


def test_unknown_class_key_names_file_line_and_key(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "p", 'description = "p"\nextends = true\n')
    error = load_error(folder)
    assert error.message == f"{folder / 'class.toml'}:2: unknown key 'extends'"


def test_wrong_setting_type_in_class_names_file_line_and_key(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "p", '[settings]\nfilesystem = "zfs"\n')
    error = load_error(folder)
    assert error.message.startswith(f"{folder / 'class.toml'}:2: [settings] filesystem: ")
    assert "'zfs' is not one of ext4, btrfs" in error.message


def test_repository_needs_name_and_uri(tmp_path: Path) -> None:
    folder = make_class(tmp_path, "r", '[[repositories]]\nname = "vendor"\n')
    error = load_error(folder)
    assert error.message == (
        f"{folder / 'class.toml'} [[repositories]] #1: `uri` is required and must be a string"
    )


def test_repository_unknown_key_and_missing_key_file(tmp_path: Path) -> None:
    folder = make_class(
        tmp_path,
        "r",
        '[[repositories]]\nname = "v"\nuri = "http://vendor.example/debian"\nsuite = ["x"]\n',
    )
    assert "unknown key 'suite'" in load_error(folder).message
    write(
        folder / "class.toml",
        f"""
        [[repositories]]
        name = "v"
        uri = "http://vendor.example/debian"
        signed_by = "{tmp_path / "missing.gpg"}"
        """,
    )
    assert (
        f"signed_by key file '{tmp_path / 'missing.gpg'}' not found" in load_error(folder).message
    )


def test_builtin_unit_links_are_symlinks() -> None:
    """Enabling and masking units are symlinks; a file holding the link's text
    is no unit at all, and systemd ignores it without a word."""
    system = [
        BUILTIN_CLASSES / "base/files/etc/systemd/system/systemd-firstboot.service",
        *BUILTIN_CLASSES.glob("*/files/etc/systemd/system/*.wants/*"),
    ]
    assert len(system) >= 2
    for link in system:
        assert link.is_symlink(), f"{link} is not a symlink"
    assert str(system[0].readlink()) == "/dev/null"


def test_recommends_follow_the_last_class_that_installs_a_package(tmp_path: Path) -> None:
    from imagesmith.config.classes import merge_classes

    desktop = tmp_path / "classes/desktop"
    desktop.mkdir(parents=True)
    (desktop / "class.toml").write_text(
        '[packages]\ninstall = ["sddm", "konsole"]\nrecommends = true\n'
    )
    server = tmp_path / "classes/server"
    server.mkdir(parents=True)
    (server / "class.toml").write_text('[packages]\ninstall = ["konsole", "less"]\n')
    merged = merge_classes((load_class(desktop, builtin=False), load_class(server, builtin=False)))
    assert merged.packages == ("sddm", "konsole", "less")
    assert merged.recommends == ("sddm",)
    (server / "class.toml").write_text('[packages]\nrecommends = "yes"\n')
    with pytest.raises(ConfigError, match="expected true or false"):
        load_class(server, builtin=False)
