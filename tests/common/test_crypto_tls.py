"""The private CA and server certificate of ``tls-init`` (fl_common/crypto/tls.py): SANs, key modes, idempotence."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fl_common.crypto.tls import (
    TlsError,
    certificate_hosts,
    check_ca_file,
    check_server_pair,
    ensure_tls,
    is_loopback_host,
    parse_hosts,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_server_certificate_names_every_host_and_chains_to_the_ca(tmp_path: Path) -> None:
    result = ensure_tls(tmp_path / "tls", "fl.example.org, 10.0.0.5,::1,FL.example.org")
    files = result.files
    assert result.ca_created and result.server_created
    assert result.hosts == ("fl.example.org", "10.0.0.5", "::1")  # normalised, de-duplicated, in order
    server, ca = _cert(files.server_cert), _cert(files.ca_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    assert certificate_hosts(server) == result.hosts
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey) and server.public_key().curve.name == "secp256r1"
    life = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=390) < life < datetime.timedelta(days=400)
    for key in (files.ca_key, files.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls").stat().st_mode & 0o077 == 0
    # Python's own TLS stack accepts the pair and the CA file
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.server_cert, files.server_key)
    ssl.create_default_context(cafile=str(files.ca_cert))
    assert check_ca_file(files.ca_cert) == 1
    assert check_server_pair(files.server_cert, files.server_key).serial_number == server.serial_number


def test_tls_init_keeps_valid_files_and_remakes_the_server_certificate_when_the_hosts_change(tmp_path: Path) -> None:
    first = ensure_tls(tmp_path, ["a.example", "127.0.0.1"])
    before = {p: p.read_bytes() for p in (first.files.ca_cert, first.files.ca_key, first.files.server_cert, first.files.server_key)}
    again = ensure_tls(tmp_path, "127.0.0.1,a.example")  # same set, other order: nothing changes
    assert not again.ca_created and not again.server_created
    assert {p: p.read_bytes() for p in before} == before
    moved = ensure_tls(tmp_path, "b.example")
    assert not moved.ca_created and moved.server_created
    assert moved.files.ca_cert.read_bytes() == before[first.files.ca_cert]  # clients keep their CA file
    assert certificate_hosts(_cert(moved.files.server_cert)) == ("b.example",)
    _cert(moved.files.server_cert).verify_directly_issued_by(_cert(moved.files.ca_cert))
    # a server certificate close to expiry is renewed; a broken CA is made again, and the server certificate with it
    later = ensure_tls(tmp_path, "b.example", now=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=380))
    assert later.server_created and not later.ca_created
    first.files.ca_key.write_bytes(b"not a key")
    remade = ensure_tls(tmp_path, "b.example")
    assert remade.ca_created and remade.server_created
    _cert(remade.files.server_cert).verify_directly_issued_by(_cert(remade.files.ca_cert))


def test_bad_hosts_and_mismatched_files_are_refused_with_one_line(tmp_path: Path) -> None:
    for bad in ("", " , ", "bad_host!", "-a.example", "a..example"):
        with pytest.raises(TlsError) as err:
            parse_hosts(bad)
        assert "\n" not in str(err.value)
    one, two = ensure_tls(tmp_path / "one", "a.example").files, ensure_tls(tmp_path / "two", "a.example").files
    with pytest.raises(TlsError, match="is not the private key"):
        check_server_pair(one.server_cert, two.server_key)
    with pytest.raises(TlsError, match="no PEM certificate"):
        check_ca_file(one.server_key)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True), ("::1", True),
                                                ("[::1]", True), ("0.0.0.0", False), ("10.0.0.5", False), ("::", False),
                                                ("fl.example.org", False), ("localhost.example.org", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_an_operators_own_rsa_ca_is_kept_and_signs_the_server_certificate(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "operator CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1000))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)  # and no key identifier
          .sign(key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    result = ensure_tls(tmp_path, "fl.example.org")
    assert not result.ca_created and result.server_created
    _cert(result.files.server_cert).verify_directly_issued_by(ca)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600  # tightened
    assert not ensure_tls(tmp_path, "fl.example.org").server_created
