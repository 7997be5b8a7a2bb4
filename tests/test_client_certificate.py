"""A client certificate that cannot be loaded is a config error naming the
config's keys and the files, before apt runs (real openssl certificates)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagesmith.config.repositories import Repository
from imagesmith.errors import ConfigError
from imagesmith.tree.aptsources import BuildSources, add_repository
from tests.repo_server import make_certificates

SOURCE = "/space/classes/vendor/class.toml:3: [[repositories]] #1"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    make_certificates(d)
    return d


def add(tmp_path: Path, cert: Path, key: Path | None) -> BuildSources:
    repo = Repository(
        name="vendor", uri="https://127.0.0.1:1/apt", suites=("trixie",), components=("main",),
        signed_by="", source=SOURCE, client_cert=str(cert), client_key=str(key or ""),
    )  # fmt: skip
    sources = BuildSources(tmp_path / "build")
    (sources.directory / "secrets").mkdir(parents=True)
    add_repository(sources, repo, tmp_path / "space")
    return sources


def test_garbage_certificate_names_the_file_and_the_key(tmp_path: Path, certificates: Path) -> None:
    garbage = tmp_path / "client.crt"
    garbage.write_bytes(b"this is not a certificate\n")
    with pytest.raises(ConfigError) as raised:
        add(tmp_path, garbage, certificates / "client.key")
    message = str(raised.value)
    assert raised.value.exit_code == 2
    assert message.startswith(f"{SOURCE} client_cert: '{garbage}' holds no PEM certificate"), (
        message
    )
    assert "SslCert" not in message
    with pytest.raises(ConfigError) as raised:
        add(tmp_path / "key", certificates / "client.crt", garbage)
    assert str(raised.value).startswith(
        f"{SOURCE} client_key: '{garbage}' holds no PEM private key"
    )


def test_key_of_another_certificate_is_refused(tmp_path: Path, certificates: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        add(tmp_path, certificates / "client.crt", certificates / "server.key")
    message = str(raised.value)
    assert f"{SOURCE} client_cert: the client certificate could not be loaded" in message
    assert f"client_cert '{certificates / 'client.crt'}'" in message
    assert f"with client_key '{certificates / 'server.key'}': KEY_VALUES_MISMATCH" in message


def test_matching_certificate_and_key_are_passed_to_apt(tmp_path: Path, certificates: Path) -> None:
    sources = add(tmp_path, certificates / "client.crt", certificates / "client.key")
    assert any("SslCert" in option for option in sources.aptopts)
    assert any("SslKey" in option for option in sources.aptopts)
