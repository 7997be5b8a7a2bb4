from __future__ import annotations

from pathlib import Path

import pytest

from imagesmith.config.interfaces import Interface, check_interface, merge_interfaces
from imagesmith.config.users import User, check_user, implied_packages, merge_users
from imagesmith.errors import ConfigError
from imagesmith.tree.network import network_file


def test_user_defaults_lock_the_password() -> None:
    user = check_user({"name": "admin"}, "w")
    assert user == User("admin")
    assert user.password_hash == "" and user.shell == "/bin/bash" and not user.sudo


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "root"}, "`name` must be a user name"),
        ({"name": "Bad Name"}, "`name` must be a user name"),
        ({"name": "a", "uid": 0}, "`uid` must be an integer from 1000"),
        ({"name": "a", "password_hash": "secret"}, "`password_hash` must be a crypt(3) hash"),
        ({"name": "a", "groups": "adm"}, "`groups` must be a list of strings"),
        ({"name": "a", "shell": "bash"}, "`shell` must be an absolute path"),
        ({"name": "a", "sudo": "yes"}, "`sudo` must be true or false"),
        ({"name": "a", "pasword_hash": "x"}, "unknown key 'pasword_hash'"),
    ],
)
def test_bad_users_are_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_user(table, "classes/x/class.toml [[users]] #1")
    assert e.value.message.startswith("classes/x/class.toml [[users]] #1: ")
    assert message in e.value.message


def test_later_user_of_the_same_name_wins_and_sudo_implies_the_package() -> None:
    users = merge_users([(User("a"), User("b")), (User("a", sudo=True),)])
    assert [u.name for u in users] == ["a", "b"] and users[0].sudo
    assert implied_packages(users) == ("sudo",)
    assert implied_packages((User("b"),)) == ()


def test_static_interface_file() -> None:
    interface = check_interface(
        {
            "name": "enp1s0",
            "addresses": ["192.0.2.10/24"],
            "gateway": "192.0.2.1",
            "dns": ["192.0.2.53"],
        },
        "w",
    )
    assert not interface.dhcp  # addresses given: no DHCP unless asked
    assert network_file(interface) == (
        "[Match]\nName=enp1s0\n\n[Network]\nDHCP=no\nAddress=192.0.2.10/24\n"
        "Gateway=192.0.2.1\nDNS=192.0.2.53\n"
    )
    assert check_interface({"name": "en*"}, "w").dhcp


@pytest.mark.parametrize(
    "table",
    [
        {"name": "e", "addresses": ["192.0.2.300/24"]},
        {"name": "e", "gateway": "nope"},
        {"addresses": []},
    ],
)
def test_bad_interfaces_are_config_errors(table: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        check_interface(table, "w")


def test_later_interface_of_the_same_name_wins() -> None:
    merged = merge_interfaces([(Interface("e", dhcp=True),), (Interface("e", ("192.0.2.1/24",)),)])
    assert merged == (Interface("e", ("192.0.2.1/24",)),)


def test_static_interfaces_become_networkmanager_keyfiles() -> None:
    import configparser

    from imagesmith.tree.network import nm_connection

    static = Interface("enp1s0", ("192.0.2.10/24", "2001:db8::10/64"), "192.0.2.1", ("192.0.2.53",))
    keyfile = configparser.ConfigParser()
    keyfile.read_string(nm_connection(static))
    assert keyfile["connection"]["interface-name"] == "enp1s0"
    assert dict(keyfile["ipv4"]) == {
        "method": "manual", "address1": "192.0.2.10/24", "gateway": "192.0.2.1", "dns": "192.0.2.53;",
    }  # fmt: skip
    assert dict(keyfile["ipv6"]) == {"method": "manual", "address1": "2001:db8::10/64"}
    glob = configparser.ConfigParser()
    glob.read_string(nm_connection(Interface("enp*", dhcp=True)))
    assert "interface-name" not in glob["connection"]
    assert glob["match"]["interface-name"] == "enp*"
    assert glob["ipv4"]["method"] == "auto"


def test_interfaces_under_network_none_are_a_config_error(tmp_path: Path) -> None:
    from imagesmith.config.space import load_config_space, resolve_image

    (tmp_path / "classes/net").mkdir(parents=True)
    (tmp_path / "classes/net/class.toml").write_text(
        '[[interfaces]]\nname = "enp1s0"\naddresses = ["192.0.2.10/24"]\n'
    )
    (tmp_path / "imagesmith.toml").write_text(
        '[images.a]\nclasses = ["base", "uefi", "net"]\nnetwork = "none"\n'
    )
    with pytest.raises(ConfigError, match='network = "none" configures no interface'):
        resolve_image(load_config_space(tmp_path), "a")
