"""A private certificate authority and a server certificate, so that the server can speak HTTPS by default.

``python -m fl_server tls-init --out DIR --hosts HOST[,HOST...]`` (and the demo) call
:func:`ensure_tls`, which writes into ``DIR``:

* ``ca.pem`` / ``ca-key.pem``: a self-signed CA (EC P-256, ten years) that exists only to sign the
  server's certificate. ``ca.pem`` is what clients get (``python -m fl_client --ca-file ca.pem``);
  ``ca-key.pem`` never leaves the server's machine.
* ``server.pem`` / ``server-key.pem``: the server's certificate (EC P-256, 397 days, the longest a
  browser accepts), signed by that CA, with one subjectAltName per host: a DNS name or an IP address.

Private keys are written 0600 (created with that mode, then renamed into place, so no other user
can ever read them). Running it again is idempotent: valid files are kept; the server certificate
is made again when the hosts changed, it expires within 30 days, or the CA changed; the CA is made
again (and with it the server certificate) only when it is missing, broken or expiring.

Why a private CA rather than one self-signed leaf: clients pin the CA file once, and the server's
certificate can be renewed (new hosts, expiry) without handing every client a new file.

The module also holds :func:`is_loopback_host`, the one rule server and client share for "this
address never leaves the machine" (plain HTTP is allowed there and nowhere else by default).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
CA_VALIDITY_DAYS = 3650
#: the CA/Browser Forum's ceiling for a server certificate; a private CA could go longer, nothing gains from it
SERVER_VALIDITY_DAYS = 397
#: a certificate that expires within this many days is made again by the next ``tls-init``
RENEW_BEFORE_DAYS = 30
#: how far back ``notBefore`` is put, so that a peer whose clock is a little behind accepts a fresh certificate
CLOCK_SKEW = datetime.timedelta(minutes=5)
MAX_HOSTS = 100
#: environment variable naming the CA file clients and admin commands verify the server with (as --ca-file)
ENV_CA_FILE = "FL_CA_FILE"

#: keys this module makes (EC P-256) and keys it accepts in files it keeps (an operator's RSA pair too)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class TlsError(ValueError):
    """A bad host name, an unreadable or mismatched certificate or key: the message is one line for the user."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1`` (with or without brackets): traffic that never leaves the machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_hosts(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"a.example,10.0.0.5"`` (or a list) -> validated, de-duplicated hosts in order: DNS names or IP addresses."""
    items = text.split(",") if isinstance(text, str) else list(text)
    hosts: list[str] = []
    for raw in items:
        host = raw.strip().strip("[]")
        if not host:
            continue
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            host = host.lower().rstrip(".")
            if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
                raise TlsError(f"--hosts: {raw.strip()!r} is neither an IP address nor a DNS name "
                               f"(letters, digits and '-' in dot-separated labels)") from None
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        raise TlsError("--hosts needs at least one DNS name or IP address, e.g. --hosts fl.example.org,10.0.0.5")
    if len(hosts) > MAX_HOSTS:
        raise TlsError(f"--hosts: at most {MAX_HOSTS} names, got {len(hosts)}")
    return tuple(hosts)


@dataclass(frozen=True)
class TlsFiles:
    """Where the four PEM files of one server live."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        d = Path(directory)
        return cls(d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY)


@dataclass(frozen=True)
class TlsInitResult:
    files: TlsFiles
    hosts: tuple[str, ...]
    ca_created: bool
    server_created: bool
    server_not_after: datetime.datetime
    ca_fingerprint_sha256: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 under a temporary name, then renamed over ``path``: never readable by others, never half written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _load_key(path: Path) -> PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)) else None


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt))


def certificate_hosts(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP addresses of a certificate's subjectAltName, in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out: list[str] = []
    for entry in san:
        if isinstance(entry, x509.DNSName):
            out.append(entry.value)
        elif isinstance(entry, x509.IPAddress):
            out.append(str(entry.value))
    return tuple(out)


def _fresh(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now + CLOCK_SKEW and \
        cert.not_valid_after_utc > now + datetime.timedelta(days=RENEW_BEFORE_DAYS)


def _usable_ca(files: TlsFiles, now: datetime.datetime) -> tuple[x509.Certificate, PrivateKey] | None:
    cert, key = _load_cert(files.ca_cert), _load_key(files.ca_key)
    if cert is None or key is None or not _same_public_key(cert, key) or not _fresh(cert, now):
        return None
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return None
    except x509.ExtensionNotFound:
        return None
    return cert, key


def _usable_server(files: TlsFiles, ca: x509.Certificate, hosts: tuple[str, ...], now: datetime.datetime) -> x509.Certificate | None:
    cert, key = _load_cert(files.server_cert), _load_key(files.server_key)
    if cert is None or key is None or not _same_public_key(cert, key) or not _fresh(cert, now):
        return None
    if set(certificate_hosts(cert)) != set(hosts):
        return None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return None
    return cert


def _make_ca(now: datetime.datetime) -> tuple[x509.Certificate, PrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Federated Learning Hub"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Federated Learning Hub private CA {serial:x}"[:64])])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _make_server(ca: x509.Certificate, ca_key: PrivateKey, hosts: tuple[str, ...],
                 now: datetime.datetime) -> tuple[x509.Certificate, PrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Federated Learning Hub"),
                         x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:  # a CA the operator brought, without the extension
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + datetime.timedelta(days=SERVER_VALIDITY_DAYS), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def ensure_tls(out: Path, hosts: str | Sequence[str], *, now: datetime.datetime | None = None) -> TlsInitResult:
    """Make (or keep) the private CA and the server certificate for ``hosts`` in ``out``; see the module docstring."""
    wanted = parse_hosts(hosts)
    moment = now or _now()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TlsError(f"cannot create {out}: {exc.strerror}") from None
    files = TlsFiles.in_dir(out)
    ca_created = server_created = False
    ca = _usable_ca(files, moment)
    if ca is None:
        ca = _make_ca(moment)
        _write_private(files.ca_key, _key_pem(ca[1]))
        _write_public(files.ca_cert, ca[0].public_bytes(serialization.Encoding.PEM))
        ca_created = True
    server = None if ca_created else _usable_server(files, ca[0], wanted, moment)
    if server is None:
        server, server_key = _make_server(ca[0], ca[1], wanted, moment)
        _write_private(files.server_key, _key_pem(server_key))
        _write_public(files.server_cert, server.public_bytes(serialization.Encoding.PEM))
        server_created = True
    for private in (files.ca_key, files.server_key):  # kept files too: a copy made with a looser mode is tightened
        if private.stat().st_mode & 0o077:
            os.chmod(private, 0o600)
    return TlsInitResult(files, wanted, ca_created, server_created, server.not_valid_after_utc,
                         ca[0].fingerprint(hashes.SHA256()).hex(":"))


def check_server_pair(certfile: str | Path, keyfile: str | Path) -> x509.Certificate:
    """The server's certificate, after checking that both files parse and belong together (a clear
    error at start-up rather than a gunicorn worker that dies on its first handshake)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    except OSError as exc:
        raise TlsError(f"cannot read --certfile {certfile}: {exc.strerror}") from None
    except ValueError:
        raise TlsError(f"--certfile {certfile} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(Path(keyfile).read_bytes(), password=None)
    except OSError as exc:
        raise TlsError(f"cannot read --keyfile {keyfile}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise TlsError(f"--keyfile {keyfile} is not an unencrypted PEM private key") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise TlsError(f"--keyfile {keyfile} is not the private key of --certfile {certfile}")
    if cert.not_valid_after_utc <= _now():
        raise TlsError(f"--certfile {certfile} expired on {cert.not_valid_after_utc:%Y-%m-%d}: run tls-init again")
    return cert


def check_ca_file(path: str | Path) -> int:
    """How many certificates a CA file holds; a :class:`TlsError` when it is unreadable or holds none."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the CA file {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"the CA file {path} holds no PEM certificate") from None
    return len(certs)


__all__ = ["CA_CERT", "CA_KEY", "ENV_CA_FILE", "SERVER_CERT", "SERVER_KEY", "TlsError", "TlsFiles", "TlsInitResult", "certificate_hosts",
           "check_ca_file", "check_server_pair", "ensure_tls", "is_loopback_host", "parse_hosts"]
