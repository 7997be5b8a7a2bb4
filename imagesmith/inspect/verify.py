"""The hygiene scan: what the build needed must not ship in the image.

`scan_tree()` looks at a root tree and returns one `Finding` per problem.
Every build runs it at the end of the finalise stage and fails on findings
that no class waived; `imagesmith verify IMAGE_FILE` runs it on a built disk
image or rootfs tarball without booting it (see `inspect/imagefiles.py` for how the
tree is read without mounts).

The findings and what each means are listed in config/findings.py.
For an image built with secure_boot on, `imagesmith verify` also reads the
ESP and reports who signed each binary on the boot path
(inspect/secureboot.py); an unsigned or altered one is a finding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesmith.formats import manifest_for
from imagesmith.inspect.imagefiles import image_tree
from imagesmith.inspect.secureboot import BootBinary, boot_path_binaries

KNOWN_PASSWORDS = ("", "root", "toor", "debian", "password", "admin", "changeme", "123456", "live")
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
SCAN_MAX_FILE = 256 * 1024
SCAN_SKIP_DIRS = ("proc", "sys", "dev", "run", "usr/share/doc", "usr/share/man", "usr/lib/modules")


@dataclass(frozen=True)
class Finding:
    code: str
    path: str
    message: str

    def line(self) -> str:
        return f"{self.code}: {self.path}: {self.message}"


@dataclass(frozen=True)
class ScanContext:
    """What a scan knows beyond the tree itself."""

    # Secrets the build used: exact contents to look for anywhere in the image.
    secrets: tuple[bytes, ...] = ()
    # SHA-256 of secrets (from a manifest), matched against whole files.
    secret_digests: frozenset[str] = frozenset()
    # Repository URIs that were only for the build.
    build_repositories: tuple[str, ...] = ()
    # The build host's resolv.conf, to recognise a copy of it.
    host_resolv_conf: bytes = b""
    waived: dict[str, str] = field(default_factory=dict)  # finding -> reason


def read(root: Path, rel: str) -> bytes:
    path = root / rel
    if path.is_symlink() or not path.is_file():
        return b""
    return path.read_bytes()


def small_files(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, path) of every non-empty regular file up to SCAN_MAX_FILE
    bytes, outside SCAN_SKIP_DIRS. One lstat per entry (scandir's), as this
    runs on every build."""
    top = os.fspath(root)
    skip = {os.path.join(top, d) for d in SCAN_SKIP_DIRS}
    pending = [top]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.path not in skip:
                        pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_size
                    if 0 < size <= SCAN_MAX_FILE:
                        yield entry.path[len(top) + 1 :], entry.path
            except OSError:
                continue


def check_file_contents(root: Path, scan: ScanContext) -> list[Finding]:
    """One pass over every small regular file: build secrets and private keys."""
    findings = []
    secrets = [s.strip() for s in scan.secrets if s.strip()]
    for rel, path in small_files(root):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if any(secret in data for secret in secrets) or (
            scan.secret_digests and secret_digest(data) in scan.secret_digests
        ):
            findings.append(Finding("build-secret", f"/{rel}", "holds a secret the build used"))
        elif PRIVATE_KEY.search(data) and not re.match(r"etc/ssh/ssh_host_\w+_key$", rel):
            findings.append(Finding("private-key", f"/{rel}", "holds a PEM private key"))
    return sorted(findings, key=lambda f: f.path)


def check_apt_auth(root: Path, scan: ScanContext) -> list[Finding]:
    paths = ["etc/apt/auth.conf"]
    auth_dir = root / "etc/apt/auth.conf.d"
    if auth_dir.is_dir():
        paths += [f"etc/apt/auth.conf.d/{p.name}" for p in auth_dir.iterdir()]
    return [
        Finding("apt-auth", f"/{rel}", "apt credentials")
        for rel in paths
        if read(root, rel).strip()
    ]


def sources_entries(root: Path) -> list[tuple[str, str]]:
    """(file, line-ish text) of every apt sources entry in the image."""
    entries = []
    for rel in ["etc/apt/sources.list", *_listdir(root, "etc/apt/sources.list.d")]:
        for line in read(root, rel).decode(errors="replace").splitlines():
            stripped = line.split("#", 1)[0].strip()
            if (
                stripped.startswith(("deb ", "deb-src ", "URIs:", "Types:"))
                or "trusted=yes" in stripped
            ):
                entries.append((f"/{rel}", stripped))
    return entries


def _listdir(root: Path, rel: str) -> list[str]:
    path = root / rel
    return sorted(f"{rel}/{p.name}" for p in path.iterdir()) if path.is_dir() else []


def check_build_repositories(root: Path, scan: ScanContext) -> list[Finding]:
    findings = []
    for path, text in sources_entries(root):
        local = re.search(r"\b(copy|file):/", text)
        build_only = any(uri in text for uri in scan.build_repositories)
        if local or build_only:
            findings.append(Finding("build-repository", path, f"build-only entry: {text}"))
    return findings


def check_unsafe_io(root: Path, scan: ScanContext) -> list[Finding]:
    return [
        Finding("unsafe-io", f"/{rel}", "dpkg force-unsafe-io is configured")
        for rel in _listdir(root, "etc/dpkg/dpkg.cfg.d") + ["etc/dpkg/dpkg.cfg"]
        if re.search(rb"^\s*force-unsafe-io", read(root, rel), re.MULTILINE)
    ]


def check_eatmydata(root: Path, scan: ScanContext) -> list[Finding]:
    findings = []
    if b"eatmydata" in read(root, "etc/ld.so.preload"):
        findings.append(Finding("eatmydata", "/etc/ld.so.preload", "preloads libeatmydata"))
    status = read(root, "var/lib/dpkg/status")
    if re.search(
        rb"^Package: (lib)?eatmydata\d*\nStatus: install ok installed", status, re.MULTILINE
    ):
        findings.append(Finding("eatmydata", "/var/lib/dpkg/status", "eatmydata is installed"))
    return findings


def check_policy_rc_d(root: Path, scan: ScanContext) -> list[Finding]:
    path = root / "usr/sbin/policy-rc.d"
    if path.exists() or path.is_symlink():
        return [Finding("policy-rc.d", "/usr/sbin/policy-rc.d", "services would never start")]
    return []


def check_fstab_barriers(root: Path, scan: ScanContext) -> list[Finding]:
    findings = []
    for line in read(root, "etc/fstab").decode(errors="replace").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 4 and re.search(r"(^|,)(nobarrier|barrier=0)(,|$)", fields[3]):
            findings.append(
                Finding("fstab-nobarrier", "/etc/fstab", f"{fields[1]} mounted {fields[3]}")
            )
    return findings


def check_ssh_host_keys(root: Path, scan: ScanContext) -> list[Finding]:
    ssh = root / "etc/ssh"
    keys = sorted(ssh.glob("ssh_host_*_key")) if ssh.is_dir() else []
    return [Finding("ssh-host-keys", f"/etc/ssh/{k.name}", "shared SSH host key") for k in keys]


def check_machine_id(root: Path, scan: ScanContext) -> list[Finding]:
    findings = []
    for rel in ("etc/machine-id", "var/lib/dbus/machine-id"):
        content = read(root, rel).strip()
        if content and content != b"uninitialized":
            findings.append(
                Finding("machine-id", f"/{rel}", "not empty: every machine would share it")
            )
    return findings


def check_resolv_conf(root: Path, scan: ScanContext) -> list[Finding]:
    content = read(root, "etc/resolv.conf")
    if content.strip() and scan.host_resolv_conf.strip() and content == scan.host_resolv_conf:
        return [Finding("host-resolv-conf", "/etc/resolv.conf", "is the build host's copy")]
    return []


def check_apt_proxy(root: Path, scan: ScanContext) -> list[Finding]:
    return [
        Finding("apt-proxy", f"/{rel}", "configures an apt proxy")
        for rel in _listdir(root, "etc/apt/apt.conf.d") + ["etc/apt/apt.conf"]
        if re.search(rb"Acquire::\w+::Proxy|Acquire\s*\{[^}]*Proxy", read(root, rel), re.I | re.S)
    ]


def root_password_problem(shadow: str) -> str:
    for line in shadow.splitlines():
        name, _, rest = line.partition(":")
        if name != "root":
            continue
        password = rest.split(":", 1)[0]
        if password == "":
            return "root has no password"
        if password.startswith(("!", "*")):
            return ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # Python 3.11/3.12; verifies with the system's libcrypt

        for word in KNOWN_PASSWORDS:
            if crypt.crypt(word, password) == password:
                return f"root's password is the well-known {word!r}"
        return ""
    return "no root entry in /etc/shadow"


def check_root_password(root: Path, scan: ScanContext) -> list[Finding]:
    problem = root_password_problem(read(root, "etc/shadow").decode(errors="replace"))
    return [Finding("root-password", "/etc/shadow", problem)] if problem else []


CHECKS: tuple[Callable[[Path, ScanContext], list[Finding]], ...] = (
    check_file_contents, check_apt_auth, check_build_repositories, check_unsafe_io,
    check_eatmydata, check_policy_rc_d, check_fstab_barriers, check_ssh_host_keys,
    check_machine_id, check_resolv_conf, check_apt_proxy, check_root_password,
)  # fmt: skip


def scan_tree(root: Path, scan: ScanContext) -> tuple[list[Finding], list[Finding]]:
    """(findings, waived findings) for the tree at `root`."""
    findings = [f for check in CHECKS for f in check(root, scan)]
    kept = [f for f in findings if f.code not in scan.waived]
    waived = [f for f in findings if f.code in scan.waived]
    return kept, waived


def secret_digest(data: bytes) -> str:
    return hashlib.sha256(data.strip()).hexdigest()


def scan_context_from_manifest(manifest: dict[str, Any]) -> ScanContext:
    hygiene = manifest.get("hygiene", {})
    return ScanContext(
        secret_digests=frozenset(hygiene.get("secret_sha256", [])),
        build_repositories=tuple(hygiene.get("build_repositories", [])),
        waived={w["finding"]: w["reason"] for w in hygiene.get("waivers", [])},
    )


@dataclass(frozen=True)
class VerifyResult:
    findings: list[Finding]
    waived: list[Finding]
    boot_path: list[BootBinary]  # a Secure Boot image's signed binaries, else empty


def check_boot_signatures(boot_path: list[BootBinary]) -> list[Finding]:
    return [
        Finding(
            "unsigned-boot-binary",
            b.path,
            "not signed" if not b.signed else "does not match its signature (altered)",
        )
        for b in boot_path
        if not (b.signed and b.intact)
    ]


def verify_image_file(image_file: Path, manifest: Path | None = None) -> VerifyResult:
    """Scan a built disk image or rootfs tarball; the manifest adds waivers and secrets.

    With a manifest that says secure_boot is on, the boot path's signatures too.
    """
    manifest = manifest or manifest_for(image_file)
    scan = ScanContext()
    secure_boot = False
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        scan = scan_context_from_manifest(data)
        secure_boot = data.get("settings", {}).get("secure_boot", "off") != "off"
    with tempfile.TemporaryDirectory(prefix="imagesmith-esp-") as esp:
        with image_tree(image_file, esp=Path(esp) if secure_boot else None) as tree:
            findings, waived = scan_tree(tree, scan)
            boot_path = boot_path_binaries(Path(esp), tree) if secure_boot else []
    signatures = check_boot_signatures(boot_path)
    findings += [f for f in signatures if f.code not in scan.waived]
    waived += [f for f in signatures if f.code in scan.waived]
    return VerifyResult(findings, waived, boot_path)
