"""The network stack written into a tree, as the `network` setting picks it.

- `networkd`: a .network file per `[[interfaces]]` table, DHCP on every
  other ethernet interface, systemd-networkd and systemd-resolved enabled.
  The wait-online unit is not enabled, so no boot waits for a network that
  isn't there.
- `networkmanager`: NetworkManager enabled.
- `none`: nothing.
"""

from __future__ import annotations

from pathlib import Path

from imagesmith.config.interfaces import Interface
from imagesmith.host.paths import write_in_root
from imagesmith.host.sandbox import run_in_root

NETWORK_DIR = "etc/systemd/network"


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


def configure_network(tree: Path, network: str, interfaces: tuple[Interface, ...]) -> None:
    if network == "networkd":
        configure_networkd(tree, interfaces)
    elif network == "networkmanager":
        run_in_root(
            tree,
            ["systemctl", "enable", "NetworkManager.service"],
            what="enabling NetworkManager",
        )
