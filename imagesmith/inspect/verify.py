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

import fnmatch
import hashlib
import hmac
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesmith.formats import manifest_for
from imagesmith.host.libcrypt import password_matches
from imagesmith.host.paths import listdir_in_root, lstat_in_root, read_in_root
from imagesmith.inspect.imagefiles import image_tree
from imagesmith.inspect.secureboot import BootBinary, boot_path_binaries

KNOWN_PASSWORDS = ("", "root", "toor", "debian", "password", "admin", "changeme", "123456", "live")
# A whole PEM private key: the header, a base64 body, the footer. The header
# alone is in plenty of code and data (parsers, mime magic), which is no key.
PRIVATE_KEY = re.compile(
    rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----\r?\n"
    rb"(?:[A-Za-z0-9-]+: [^\n]*\r?\n)*\s*[A-Za-z0-9+/=\s]{32,}?"
    rb"-----END \1PRIVATE KEY-----"
)
SCAN_MAX_FILE = 256 * 1024
SCAN_NEVER = ("proc", "sys", "dev", "run")
# Where no private key or configuration lives: skipped unless the build had secrets.
SCAN_SKIP_DIRS = (*SCAN_NEVER, "usr/share/doc", "usr/share/man", "usr/lib/modules")
SCAN_CHUNK = 4 * 1024 * 1024
NO_BARRIER = re.compile(r"(^|,)(nobarrier|barrier=0)(,|$)")


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
    # Keyed digests of secrets (from a manifest), matched against whole files.
    secret_digests: frozenset[str] = frozenset()
    secret_key: bytes = b""
    # Repository URIs that were only for the build.
    build_repositories: tuple[str, ...] = ()
    # The build host's resolv.conf, to recognise a copy of it.
    host_resolv_conf: bytes = b""
    waived: dict[str, str] = field(default_factory=dict)  # finding -> reason
    # What an earlier scan of most of this tree found: only the rest is read.
    baseline: Baseline | None = None


@dataclass(frozen=True)
class ContentFindings:
    """The file-content pass's raw result: relative paths of files holding a
    build secret, and of files holding a PEM private key (not yet checked
    against what packages ship)."""

    secret_files: frozenset[str] = frozenset()
    key_files: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, list[str]]:
        return {"secret_files": sorted(self.secret_files), "key_files": sorted(self.key_files)}

    @classmethod
    def from_json(cls, data: dict[str, list[str]]) -> ContentFindings:
        return cls(frozenset(data["secret_files"]), frozenset(data["key_files"]))


@dataclass(frozen=True)
class Baseline:
    """A tree whose files are known except `changed` ones: `known` is what
    the content pass found in the tree they came from (a cached package
    stage), with the same secrets. The scan reads only `changed`."""

    known: ContentFindings
    changed: frozenset[str]  # relative paths of files made or written since


def read(root: Path, rel: str) -> bytes:
    """A file of the tree, its symlinks resolved inside the tree: a hostile
    image's `etc -> /etc` never makes the scan read the host's files."""
    return read_in_root(root, rel) or b""


def tree_files(root: Path, skip: tuple[str, ...]) -> Iterator[tuple[str, str, int]]:
    """(relative path, path, size) of every non-empty regular file outside
    `skip`. Symlinks are never followed. One lstat per entry (scandir's), as
    this runs on every build."""
    top = os.fspath(root)
    skipped = {os.path.join(top, d) for d in skip}
    pending = [top]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.path not in skipped:
                        pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_size
                    if size > 0:
                        yield entry.path[len(top) + 1 :], entry.path, size
            except OSError:
                continue


def holds_secret(path: str, secrets: list[bytes]) -> bool:
    """Whether a file of any size holds one of `secrets`: read once, in
    chunks that overlap by the longest secret."""
    overlap = max(len(s) for s in secrets) - 1
    tail = b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(SCAN_CHUNK):
                window = tail + chunk
                if any(secret in window for secret in secrets):
                    return True
                tail = window[-overlap:] if overlap else b""
    except OSError:
        pass
    return False


def changed_files(
    root: Path, changed: frozenset[str], skip: tuple[str, ...]
) -> Iterator[tuple[str, str, int]]:
    """`tree_files()` for the given relative paths only."""
    top = os.fspath(root)
    for rel in sorted(changed):
        if any(rel.startswith(f"{d}/") for d in skip):
            continue
        path = os.path.join(top, rel)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            yield rel, path, st.st_size


def scan_contents(
    root: Path, scan: ScanContext, only: frozenset[str] | None = None
) -> ContentFindings:
    """One pass over the files (or the `only` ones): build secrets anywhere in
    any file (when the build had secrets), private keys and secret digests in
    small files."""
    secret_files, key_files = set(), set()
    secrets = [s.strip() for s in scan.secrets if s.strip()]
    skip = SCAN_NEVER if secrets else SCAN_SKIP_DIRS
    files = tree_files(root, skip) if only is None else changed_files(root, only, skip)
    for rel, path, size in files:
        if secrets and holds_secret(path, secrets):
            secret_files.add(rel)
            continue
        if size > SCAN_MAX_FILE or rel.startswith(SCAN_SKIP_DIRS):
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if scan.secret_digests and secret_digest(data, scan.secret_key) in scan.secret_digests:
            secret_files.add(rel)
        elif PRIVATE_KEY.search(data) and not re.match(r"etc/ssh/ssh_host_\w+_key$", rel):
            key_files.add(rel)
    return ContentFindings(frozenset(secret_files), frozenset(key_files))


def check_file_contents(root: Path, scan: ScanContext) -> list[Finding]:
    """Build secrets and private keys in the tree's files; with a baseline,
    only its changed files are read, and what it knew of the others holds
    where they are still there."""
    found = scan_contents(root, scan, None if scan.baseline is None else scan.baseline.changed)
    if scan.baseline is not None:
        base, changed = scan.baseline.known, scan.baseline.changed

        def kept(rels: frozenset[str]) -> frozenset[str]:
            return frozenset(r for r in rels if r not in changed and lstat_in_root(root, r))

        found = ContentFindings(
            found.secret_files | kept(base.secret_files), found.key_files | kept(base.key_files)
        )
    findings = [
        Finding("build-secret", f"/{rel}", "holds a secret the build used")
        for rel in found.secret_files
    ]
    # A key a Debian package ships (a test suite's, say) is the distribution's,
    # not one the build left: only keys no package owns are findings.
    owned = package_files(root) if found.key_files else set()
    findings += [
        Finding("private-key", f"/{rel}", "holds a PEM private key no package ships")
        for rel in found.key_files
        if f"/{rel}" not in owned
    ]
    return sorted(findings, key=lambda f: f.path)


def package_files(root: Path) -> set[str]:
    """Every path dpkg says an installed package owns (var/lib/dpkg/info/*.list)."""
    owned: set[str] = set()
    for name in listdir_in_root(root, "var/lib/dpkg/info"):
        if name.endswith(".list"):
            owned.update(
                read(root, f"var/lib/dpkg/info/{name}").decode(errors="replace").splitlines()
            )
    return owned


def check_apt_auth(root: Path, scan: ScanContext) -> list[Finding]:
    paths = ["etc/apt/auth.conf", *_listdir(root, "etc/apt/auth.conf.d")]
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
    return [f"{rel}/{name}" for name in listdir_in_root(root, rel)]


def check_build_repositories(root: Path, scan: ScanContext) -> list[Finding]:
    findings = []
    for path, text in sources_entries(root):
        local = re.search(r"\b(copy|file):/", text)
        build_only = any(uri in text for uri in scan.build_repositories)
        if local or build_only:
            findings.append(Finding("build-repository", path, f"build-only entry: {text}"))
    return findings


def check_unsafe_io(root: Path, scan: ScanContext) -> list[Finding]:
    """force-unsafe-io in dpkg's own configuration, or handed to dpkg by apt
    (`DPkg::Options {"--force-unsafe-io";};`)."""
    dpkg = [
        Finding("unsafe-io", f"/{rel}", "dpkg force-unsafe-io is configured")
        for rel in _listdir(root, "etc/dpkg/dpkg.cfg.d") + ["etc/dpkg/dpkg.cfg"]
        if re.search(rb"^\s*force-unsafe-io", read(root, rel), re.MULTILINE)
    ]
    apt = [
        Finding("unsafe-io", f"/{rel}", "apt passes dpkg --force-unsafe-io")
        for rel in _listdir(root, "etc/apt/apt.conf.d") + ["etc/apt/apt.conf"]
        if re.search(rb"force-unsafe-io", apt_config_text(read(root, rel)), re.I)
    ]
    return dpkg + apt


def apt_config_text(data: bytes) -> bytes:
    """apt.conf(5) without its comments (`//`, `#` and `/* */`)."""
    data = re.sub(rb"/\*.*?\*/", b"", data, flags=re.S)
    return re.sub(rb"(^|\s)(//|#).*$", b"", data, flags=re.M)


def check_eatmydata(root: Path, scan: ScanContext) -> list[Finding]:
    findings = []
    for rel in ("etc/ld.so.preload", "etc/environment"):
        if b"eatmydata" in read(root, rel):
            findings.append(Finding("eatmydata", f"/{rel}", "preloads libeatmydata"))
    # A diversion that puts a wrapper in place of dpkg (or anything) running eatmydata.
    diversions = read(root, "var/lib/dpkg/diversions").decode(errors="replace").splitlines()
    for diverted in diversions[::3]:
        if diverted.startswith("/") and b"eatmydata" in read(root, diverted):
            findings.append(Finding("eatmydata", diverted, "a diversion runs eatmydata"))
    status = read(root, "var/lib/dpkg/status")
    if re.search(
        rb"^Package: (lib)?eatmydata\d*\nStatus: install ok installed", status, re.MULTILINE
    ):
        findings.append(Finding("eatmydata", "/var/lib/dpkg/status", "eatmydata is installed"))
    return findings


def check_policy_rc_d(root: Path, scan: ScanContext) -> list[Finding]:
    if lstat_in_root(root, "usr/sbin/policy-rc.d") is not None:
        return [Finding("policy-rc.d", "/usr/sbin/policy-rc.d", "services would never start")]
    return []


def check_fstab_barriers(root: Path, scan: ScanContext) -> list[Finding]:
    findings = []
    for line in read(root, "etc/fstab").decode(errors="replace").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 4 and NO_BARRIER.search(fields[3]):
            findings.append(
                Finding("fstab-nobarrier", "/etc/fstab", f"{fields[1]} mounted {fields[3]}")
            )
    # systemd mount units mount with their own Options=.
    for unit_dir in ("etc/systemd/system", "usr/lib/systemd/system", "run/systemd/system"):
        for rel in _listdir(root, unit_dir):
            if not rel.endswith(".mount"):
                continue
            for line in read(root, rel).decode(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "Options" and NO_BARRIER.search(value.strip()):
                    findings.append(Finding("fstab-nobarrier", f"/{rel}", f"Options={value}"))
    return findings


def check_ssh_host_keys(root: Path, scan: ScanContext) -> list[Finding]:
    keys = [n for n in listdir_in_root(root, "etc/ssh") if fnmatch.fnmatch(n, "ssh_host_*_key")]
    return [Finding("ssh-host-keys", f"/etc/ssh/{k}", "shared SSH host key") for k in keys]


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
        for word in KNOWN_PASSWORDS:
            if password_matches(word, password):
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


def secret_digest(data: bytes, key: bytes) -> str:
    """A keyed digest of a secret (see cache/keys.py): without the build
    host's key, nobody can test a guess against it."""
    return hmac.new(key, data.strip(), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """Names the key a manifest's digests were made with, without giving it away."""
    return hashlib.sha256(b"imagesmith hygiene key\0" + key).hexdigest()[:16]


def scan_context_from_manifest(manifest: dict[str, Any], key: bytes = b"") -> ScanContext:
    """Waivers and build-only repositories; the secret digests only with the
    key they were made with (the build host's)."""
    hygiene = manifest.get("hygiene", {})
    usable = bool(key) and hygiene.get("secret_key_id") == key_id(key)
    return ScanContext(
        secret_digests=frozenset(hygiene.get("secret_hmac_sha256", []) if usable else ()),
        secret_key=key,
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


def verify_image_file(
    image_file: Path, manifest: Path | None = None, *, key: bytes = b""
) -> VerifyResult:
    """Scan a built disk image or rootfs tarball; the manifest adds waivers and,
    with the build host's hygiene `key`, the digests of the build's secrets.

    With a manifest that says secure_boot is on, the boot path's signatures too.
    """
    manifest = manifest or manifest_for(image_file)
    scan = ScanContext()
    secure_boot = False
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        scan = scan_context_from_manifest(data, key)
        secure_boot = data.get("settings", {}).get("secure_boot", "off") != "off"
    with tempfile.TemporaryDirectory(prefix="imagesmith-esp-") as esp:
        with image_tree(image_file, esp=Path(esp) if secure_boot else None) as tree:
            findings, waived = scan_tree(tree, scan)
            boot_path = boot_path_binaries(Path(esp), tree) if secure_boot else []
    signatures = check_boot_signatures(boot_path)
    findings += [f for f in signatures if f.code not in scan.waived]
    waived += [f for f in signatures if f.code in scan.waived]
    return VerifyResult(findings, waived, boot_path)
