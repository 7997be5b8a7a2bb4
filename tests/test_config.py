"""Unit tests for loading a config space and resolving an image from it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagesmith.config.classes import BUILTIN_CLASSES
from imagesmith.config.settings import GiB, MiB
from imagesmith.config.space import load_config_space, resolve_image
from imagesmith.config.tomlfile import locate
from imagesmith.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def make_space(tmp_path: Path, config: str, classes: dict[str, str] | None = None) -> Path:
    """A config space: imagesmith.toml plus classes/NAME/class.toml per entry."""
    space = tmp_path / "space"
    write(space / "imagesmith.toml", config)
    for name, class_toml in (classes or {}).items():
        write(space / "classes" / name / "class.toml", class_toml)
    return space


def config_error(space: Path, image: str | None = None) -> ConfigError:
    """The ConfigError that loading (and resolving `image`) raises."""
    with pytest.raises(ConfigError) as e:
        loaded = load_config_space(space)
        if image is not None:
            resolve_image(loaded, image)
    assert e.value.exit_code == 2
    return e.value


PRECEDENCE_CONFIG = """
    [defaults]
    hostname = "from-defaults"
    suite = "from-defaults"
    filesystem = "btrfs"
    components = ["main", "contrib"]
    kernel_cmdline = ["d"]

    [images.web]
    classes = ["one", "two"]
    description = "a web server"
    hostname = "from-image"
    kernel_cmdline = ["i"]
"""
PRECEDENCE_CLASSES = {
    "one": """
        [settings]
        hostname = "from-one"
        suite = "from-one"
        serial_console = "ttyS1,9600"
        kernel_cmdline = ["one"]
    """,
    "two": """
        [settings]
        hostname = "from-two"
        serial_console = "ttyS2,57600"
        kernel_cmdline = ["two"]
    """,
}


def test_precedence_defaults_then_classes_then_image_then_overrides(tmp_path: Path) -> None:
    space = load_config_space(make_space(tmp_path, PRECEDENCE_CONFIG, PRECEDENCE_CLASSES))
    image = resolve_image(space, "web", overrides={"filesystem": "ext4"})
    s = image.settings
    assert s.components == ("main", "contrib")  # only [defaults] sets it
    assert s.suite == "from-one"  # a class beats [defaults]
    assert s.serial_console == "ttyS2,57600"  # the later class wins
    assert s.hostname == "from-image"  # the image table beats the classes
    assert s.filesystem == "ext4"  # overrides beat everything
    assert s.kernel_cmdline == ("d", "one", "two", "i")  # append, lowest first
    # The built-in classes the first-boot switches add come first.
    assert image.class_names == ("grow-root", "new-fs-uuid", "new-ssh-host-keys", "one", "two")
    assert image.description == "a web server"
    assert image.config_space == space.path


def test_without_overrides_defaults_apply(tmp_path: Path) -> None:
    space = load_config_space(make_space(tmp_path, PRECEDENCE_CONFIG, PRECEDENCE_CLASSES))
    assert resolve_image(space, "web").settings.filesystem == "btrfs"


def test_settings_not_set_anywhere_keep_the_table_default(tmp_path: Path) -> None:
    space = load_config_space(make_space(tmp_path, '[images.a]\nclasses = ["base"]\n', {}))
    s = resolve_image(space, "a").settings
    assert (s.size, s.esp_size, s.hostname) == (2 * GiB, 256 * MiB, "debian")


def test_sizes_are_parsed_at_load_time(tmp_path: Path) -> None:
    space = load_config_space(
        make_space(
            tmp_path,
            """
            [defaults]
            size = "3GiB"
            [images.a]
            classes = []
            esp_size = "128M"
            """,
        )
    )
    assert space.defaults == {"size": 3 * GiB}
    assert space.images["a"]["settings"] == {"esp_size": 128 * MiB}


def test_default_image_is_the_first_image_when_not_set(tmp_path: Path) -> None:
    config = """
        [images.zeta]
        classes = []
        [images.alpha]
        classes = []
    """
    assert load_config_space(make_space(tmp_path, config)).default_image == "zeta"


def test_default_image_can_name_any_image(tmp_path: Path) -> None:
    config = """
        default_image = "alpha"
        [images.zeta]
        classes = []
        [images.alpha]
        classes = []
    """
    assert load_config_space(make_space(tmp_path, config)).default_image == "alpha"


def test_default_image_must_be_defined(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        default_image = "nope"
        [images.a]
        classes = []
        """,
    )
    error = config_error(space)
    assert error.message.startswith(f"{space / 'imagesmith.toml'}:1: ")
    assert "default_image 'nope' is not a defined image" in error.message
    assert error.hint == "defined images: a"


def test_default_image_of_wrong_type_is_a_config_error(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        default_image = ["a"]
        [images.a]
        classes = []
        """,
    )
    error = config_error(space)
    assert "default_image" in error.message


def test_unknown_top_level_key_names_file_line_and_key(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        # comment
        default_image = "a"
        defaults_image = "a"
        [images.a]
        classes = []
        """,
    )
    error = config_error(space)
    assert error.message == f"{space / 'imagesmith.toml'}:3: unknown top-level key 'defaults_image'"
    assert "default_image" in error.hint


def test_unknown_top_level_table_names_the_file(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [image.a]
        classes = []
        """,
    )
    error = config_error(space)
    assert str(space / "imagesmith.toml") in error.message
    assert "unknown top-level key 'image'" in error.message


def test_unknown_image_key_names_file_line_and_key(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [images.a]
        classes = []
        hostname = "h"

        [images.b]
        classes = []
        filesytem = "btrfs"
        """,
    )
    error = config_error(space)
    assert error.message == (
        f"{space / 'imagesmith.toml'}:7: [images.b] filesytem: unknown setting 'filesytem'"
    )
    assert "filesystem" in error.hint


def test_unknown_key_in_defaults_names_file_line_and_key(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [defaults]
        classes = ["base"]
        [images.a]
        classes = []
        """,
    )
    error = config_error(space)
    assert error.message == (
        f"{space / 'imagesmith.toml'}:2: [defaults] classes: unknown setting 'classes'"
    )


def test_wrong_type_names_file_line_and_key(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [defaults]
        suite = "trixie"

        [images.a]
        classes = []
        size = true
        """,
    )
    error = config_error(space)
    assert error.message.startswith(f"{space / 'imagesmith.toml'}:6: [images.a] size: ")
    assert "expected a size" in error.message


def test_wrong_type_in_defaults_names_file_line_and_key(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [defaults]
        hostname = 42
        [images.a]
        classes = []
        """,
    )
    error = config_error(space)
    assert error.message == (
        f"{space / 'imagesmith.toml'}:2: [defaults] hostname: expected a string, got 42"
    )


def test_missing_classes_list_names_the_image_table(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [images.a]
        classes = []

        [images.b]
        size = "2GiB"
        """,
    )
    error = config_error(space)
    assert error.message == f"{space / 'imagesmith.toml'}:4: [images.b] has no `classes` list"


@pytest.mark.parametrize("classes", ['"base"', '["base", 1]'])
def test_classes_must_be_a_list_of_names(tmp_path: Path, classes: str) -> None:
    space = make_space(tmp_path, f"[images.a]\nclasses = {classes}\n")
    error = config_error(space)
    assert error.message.startswith(f"{space / 'imagesmith.toml'}:2: [images.a] classes: ")
    assert "expected a list of class names" in error.message


def test_class_listed_twice_is_an_error(tmp_path: Path) -> None:
    space = make_space(tmp_path, '[images.a]\nclasses = ["base", "uefi", "base"]\n')
    error = config_error(space)
    assert error.message == (
        f"{space / 'imagesmith.toml'}:2: [images.a] classes: a class is listed twice"
    )


def test_no_images_is_an_error(tmp_path: Path) -> None:
    space = make_space(tmp_path, '[defaults]\nsuite = "trixie"\n')
    error = config_error(space)
    assert error.message == f"{space / 'imagesmith.toml'}: no images defined"


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    error = config_error(tmp_path)
    assert error.message == f"{tmp_path.resolve() / 'imagesmith.toml'}: not found"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    space = make_space(tmp_path, "[images.a\nclasses = []\n")
    error = config_error(space)
    assert error.message.startswith(f"{space / 'imagesmith.toml'}: invalid TOML")


def test_unknown_class_names_file_line_and_class(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [images.a]
        description = "x"
        classes = ["base", "mine", "nope"]
        """,
        {"mine": 'description = "mine"\n'},
    )
    error = config_error(space, "a")
    assert error.message == f"{space / 'imagesmith.toml'}:3: unknown class 'nope'"
    # The hint lists both config-space and built-in classes.
    known = sorted({"mine", *(p.name for p in BUILTIN_CLASSES.iterdir())})
    assert f"known classes: {', '.join(known)}" in error.hint


def test_invalid_class_name_is_an_error(tmp_path: Path) -> None:
    space = make_space(tmp_path, '[images.a]\nclasses = ["../etc"]\n')
    error = config_error(space, "a")
    assert error.message == (f"{space / 'imagesmith.toml'}:2: '../etc' is not a valid class name")


def test_unknown_image_name_is_an_error(tmp_path: Path) -> None:
    space = load_config_space(make_space(tmp_path, "[images.a]\nclasses = []\n"))
    with pytest.raises(ConfigError) as e:
        resolve_image(space, "b")
    assert e.value.message == f"{space.config_file}: no image named 'b'"
    assert e.value.hint == "defined images: a"


def test_size_too_small_names_the_file_and_key(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        """
        [images.tiny]
        classes = []
        size = "300MiB"
        """,
    )
    error = config_error(space, "tiny")
    assert error.message.startswith(f"{space / 'imagesmith.toml'} [images.tiny] size: ")
    assert "a 300MiB disk leaves 42.98MiB for the root filesystem" in error.message
    assert error.hint == "set size to at least 514MiB"


def test_size_too_small_from_a_class_is_caught(tmp_path: Path) -> None:
    space = make_space(
        tmp_path,
        '[images.a]\nclasses = ["small"]\n',
        {"small": '[settings]\nesp_size = "32MiB"\n'},
    )
    error = config_error(space, "a")
    assert "esp_size 32MiB is below the minimum 64MiB" in error.message


def test_resolved_image_merges_class_packages_and_repositories(tmp_path: Path) -> None:
    key = tmp_path / "vendor.gpg"
    key.write_bytes(b"not really a key")
    space = load_config_space(
        make_space(
            tmp_path,
            """
            [defaults]
            suite = "forky"
            [images.a]
            classes = ["base", "vendor"]
            """,
            {
                "vendor": f"""
                    [packages]
                    install = ["vendor-tool"]
                    remove = ["nano"]

                    [[repositories]]
                    name = "vendor"
                    uri = "http://vendor.example/debian"
                    signed_by = "{key}"
                """
            },
        )
    )
    image = resolve_image(space, "a")
    # The classes' packages in order, then what settings imply (the network stack).
    assert image.packages[-2:] == ("vendor-tool", "systemd-resolved")
    assert "linux-image-amd64" in image.packages
    assert image.remove_packages == ("nano",)
    [repo] = image.repositories
    assert (repo.name, repo.uri, repo.signed_by) == (
        "vendor",
        "http://vendor.example/debian",
        str(key),
    )
    # Repositories default to the image's suite and to "main".
    assert repo.suites == ("forky",)
    assert repo.components == ("main",)
    assert str(space.path / "classes/vendor/class.toml") in repo.source


def test_locate_finds_keys_in_their_section(tmp_path: Path) -> None:
    path = write(
        tmp_path / "f.toml",
        """
        size = 1
        [defaults]
        size = 2
        [images.a]
        classes = []
        size = 3
        """,
    )
    assert locate(path, "size") == f"{path}:1"
    assert locate(path, "size", section="defaults") == f"{path}:3"
    assert locate(path, "size", section="images.a") == f"{path}:6"
    assert locate(path, "", section="images.a") == f"{path}:4"
    assert locate(path, "missing", section="images.a") == str(path)


def test_locate_handles_a_comment_after_a_section_header(tmp_path: Path) -> None:
    path = write(
        tmp_path / "f.toml",
        """
        [defaults]  # settings for every image
        size = 2
        """,
    )
    assert locate(path, "size", section="defaults") == f"{path}:2"


@pytest.mark.parametrize("overrides", [{"size": "4GiB"}, {"sise": "4GiB"}])
def test_overrides_are_checked_like_settings(tmp_path: Path, overrides: dict[str, str]) -> None:
    space = load_config_space(make_space(tmp_path, "[images.a]\nclasses = []\n"))
    try:
        image = resolve_image(space, "a", overrides=overrides)
    except ConfigError:
        return
    assert image.settings.size == 4 * GiB


def test_verbose_is_taken_before_and_after_the_verb() -> None:
    from imagesmith.cli.parser import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "build"]).verbose is True
    assert parser.parse_args(["build", "-v"]).verbose is True
    assert parser.parse_args(["verify", "disk.raw", "--verbose"]).verbose is True
    assert parser.parse_args(["build"]).verbose is False
