"""The hygiene scan's findings by name: what a class may waive, and what
`imagesmith verify` reports. The checks themselves are in inspect/verify.py."""

from __future__ import annotations

FINDINGS: dict[str, str] = {
    "build-secret": "a client certificate, key or credential the build used is in the image",
    "private-key": "a PEM private key outside the SSH host key paths",
    "apt-auth": "apt credentials (auth.conf) are in the image",
    "build-repository": "a sources entry that was for the build only (local or not kept)",
    "unsafe-io": "dpkg force-unsafe-io is configured",
    "eatmydata": "eatmydata is installed or preloaded",
    "policy-rc.d": "/usr/sbin/policy-rc.d exists, so services would never start",
    "fstab-nobarrier": "fstab mounts with nobarrier or barrier=0",
    "ssh-host-keys": "SSH host keys would be shared by every machine",
    "machine-id": "/etc/machine-id is not empty, so every machine would share it",
    "host-resolv-conf": "the build host's resolver configuration was left in",
    "apt-proxy": "an apt proxy setting is configured",
    "root-password": "root has no password or a well-known one",
    "unsigned-boot-binary": "a Secure Boot image's shim, GRUB or kernel is unsigned or "
    "no longer matches its signature",
}
