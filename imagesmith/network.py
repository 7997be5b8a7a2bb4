"""Network configuration and DNS.

The `network` setting picks the stack:

- `networkd` (default): systemd-networkd with DHCP on every ethernet
  interface, systemd-resolved for DNS. `[[interfaces]]` tables in class.toml
  give static addresses per interface (a later class's interface of the same
  name replaces the earlier one). The wait-online unit is not enabled, so no
  boot waits for a network that isn't there.
- `networkmanager`: NetworkManager, for desktops.
- `none`: nothing configured.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imagesmith.errors import ConfigError
from imagesmith.sandbox import run_in_root

if TYPE_CHECKING:
    from imagesmith.context import BuildContext

INTERFACE_KEYS = {"name", "addresses", "gateway", "dns", "dhcp"}
NETWORK_DIR = "etc/systemd/network"


@dataclass(frozen=True)
class Interface:
    name: str  # an interface name or a networkd Name= glob, like "enp*"
    addresses: tuple[str, ...] = ()
    gateway: str = ""
    dns: tuple[str, ...] = ()
    dhcp: bool = False


def check_interface(table: object, where: str) -> Interface:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in table:
        if key not in INTERFACE_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}",
                hint=f"allowed: {', '.join(sorted(INTERFACE_KEYS))}",
            )
    name = table.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f'{where}: `name` must be an interface name such as "enp1s0"')
    addresses, dns = table.get("addresses", []), table.get("dns", [])
    try:
        for address in addresses:
            ipaddress.ip_interface(address)
        for server in dns:
            ipaddress.ip_address(server)
        if table.get("gateway"):
            ipaddress.ip_address(table["gateway"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}", hint='addresses like "192.0.2.10/24"') from e
    dhcp = table.get("dhcp", not addresses)
    if not isinstance(dhcp, bool):
        raise ConfigError(f"{where}: `dhcp` must be true or false")
    return Interface(name, tuple(addresses), table.get("gateway", ""), tuple(dns), dhcp)


def interfaces_from(tables: Any, where: str) -> tuple[Interface, ...]:
    if not isinstance(tables, list):
        raise ConfigError(f"{where}: use [[interfaces]] tables")
    return tuple(
        check_interface(t, f"{where} [[interfaces]] #{i + 1}") for i, t in enumerate(tables)
    )


def merge_interfaces(layers: list[tuple[Interface, ...]]) -> tuple[Interface, ...]:
    merged: dict[str, Interface] = {}
    for layer in layers:
        for interface in layer:
            merged[interface.name] = interface
    return tuple(merged.values())


def implied_packages(network: str) -> tuple[str, ...]:
    return {"networkd": ("systemd-resolved",), "networkmanager": ("network-manager",)}.get(
        network, ()
    )


def network_file(interface: Interface) -> str:
    lines = ["[Match]", f"Name={interface.name}", "", "[Network]"]
    lines.append(f"DHCP={'yes' if interface.dhcp else 'no'}")
    lines += [f"Address={a}" for a in interface.addresses]
    if interface.gateway:
        lines.append(f"Gateway={interface.gateway}")
    lines += [f"DNS={d}" for d in interface.dns]
    return "\n".join(lines) + "\n"


DHCP_ALL_ETHERNET = """\
# Written by imagesmith: DHCP on every ethernet interface without a file of its own.
[Match]
Type=ether
Kind=!*

[Network]
DHCP=yes
"""


def configure_networkd(ctx: BuildContext) -> None:
    directory = ctx.tree / NETWORK_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for i, interface in enumerate(ctx.image.interfaces):
        (
            directory / f"{10 + i:02d}-imagesmith-{interface.name.replace('*', 'any')}.network"
        ).write_text(network_file(interface))
    (directory / "90-imagesmith-dhcp.network").write_text(DHCP_ALL_ETHERNET)
    run_in_root(
        ctx.tree,
        ["systemctl", "enable", "systemd-networkd.service", "systemd-resolved.service"],
        what="enabling systemd-networkd",
    )
    # Enabling networkd also enables wait-online, which stalls boots without a network.
    run_in_root(
        ctx.tree,
        ["systemctl", "disable", "systemd-networkd-wait-online.service"],
        what="disabling wait-online",
    )


def configure_network(ctx: BuildContext) -> None:
    if ctx.image.target != "disk":
        return  # a container's network is its runtime's business
    network = ctx.image.settings.network
    if network == "networkd":
        configure_networkd(ctx)
    elif network == "networkmanager":
        run_in_root(
            ctx.tree,
            ["systemctl", "enable", "NetworkManager.service"],
            what="enabling NetworkManager",
        )
