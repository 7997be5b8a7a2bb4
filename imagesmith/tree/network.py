"""The network stack written into a tree, as the `network` setting picks it.

- `networkd`: a .network file per `[[interfaces]]` table, DHCP on every
  other ethernet interface, systemd-networkd and systemd-resolved enabled.
  The wait-online unit is not enabled, so no boot waits for a network that
  isn't there.
- `networkmanager`: NetworkManager enabled; each `[[interfaces]]` table
  becomes a keyfile connection in /etc/NetworkManager/system-connections
  (mode 0600, as NetworkManager requires), every other ethernet interface
  gets NetworkManager's own automatic DHCP.
- `none`: nothing (a class with `[[interfaces]]` is then a config error).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from imagesmith.config.interfaces import Interface
from imagesmith.host.paths import write_in_root
from imagesmith.host.sandbox import run_in_root

NETWORK_DIR = "etc/systemd/network"
NM_DIR = "etc/NetworkManager/system-connections"


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


def configure_networkd(tree: Path, interfaces: tuple[Interface, ...]) -> None:
    for i, interface in enumerate(interfaces):
        name = f"{10 + i:02d}-imagesmith-{interface.name.replace('*', 'any')}.network"
        write_in_root(tree, f"{NETWORK_DIR}/{name}", network_file(interface))
    write_in_root(tree, f"{NETWORK_DIR}/90-imagesmith-dhcp.network", DHCP_ALL_ETHERNET)
    run_in_root(
        tree,
        ["systemctl", "enable", "systemd-networkd.service", "systemd-resolved.service"],
        what="enabling systemd-networkd",
    )
    # Enabling networkd also enables wait-online, which stalls boots without a network.
    run_in_root(
        tree,
        ["systemctl", "disable", "systemd-networkd-wait-online.service"],
        what="disabling wait-online",
    )


def nm_connection(interface: Interface) -> str:
    """A NetworkManager keyfile for one interface (nm-settings-keyfile(5))."""
    glob = any(c in interface.name for c in "*?[")
    lines = ["[connection]", f"id=imagesmith-{interface.name}", "type=ethernet", "autoconnect=true"]
    if not glob:
        lines.append(f"interface-name={interface.name}")
    lines.append("")
    if glob:
        lines += ["[match]", f"interface-name={interface.name}", ""]
    for family, version in (("ipv4", 4), ("ipv6", 6)):
        addresses = [a for a in interface.addresses if ipaddress.ip_interface(a).version == version]
        method = "auto" if interface.dhcp else "manual" if addresses else "disabled"
        if version == 6 and method == "disabled":
            method = "ignore"
        lines += [f"[{family}]", f"method={method}"]
        lines += [f"address{i + 1}={a}" for i, a in enumerate(addresses)]
        gateway = interface.gateway
        if gateway and ipaddress.ip_address(gateway).version == version:
            lines.append(f"gateway={gateway}")
        dns = [d for d in interface.dns if ipaddress.ip_address(d).version == version]
        if dns:
            lines.append(f"dns={';'.join(dns)};")
        lines.append("")
    return "\n".join(lines)


def configure_networkmanager(tree: Path, interfaces: tuple[Interface, ...]) -> None:
    for interface in interfaces:
        name = f"imagesmith-{interface.name.replace('*', 'any')}.nmconnection"
        write_in_root(tree, f"{NM_DIR}/{name}", nm_connection(interface), mode=0o600)
    run_in_root(
        tree, ["systemctl", "enable", "NetworkManager.service"], what="enabling NetworkManager"
    )


def configure_network(tree: Path, network: str, interfaces: tuple[Interface, ...]) -> None:
    if network == "networkd":
        configure_networkd(tree, interfaces)
    elif network == "networkmanager":
        configure_networkmanager(tree, interfaces)
