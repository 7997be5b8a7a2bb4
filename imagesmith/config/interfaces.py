"""Network interfaces as classes declare them, and what each stack needs.

The `network` setting picks the stack (the customise stage writes it, see
tree/network.py):

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
from typing import Any

from imagesmith.config.tomlfile import check_keys
from imagesmith.errors import ConfigError

INTERFACE_KEYS = {"name", "addresses", "gateway", "dns", "dhcp"}


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
    check_keys(table, INTERFACE_KEYS, where)
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
