"""The keys behind secure aggregation on a client: its own long-term Ed25519 identity, and the
verifying keys of the peers it trusts (pinned out of band).

Why pinning: the server ships every member's verifying key in the round's roster, so a malicious
server could substitute a key of its own for a neighbour's and remove that neighbour's masks
(fl_common/secagg/auth.py). A client given the pinned keys accepts a roster only when every other
member carries one of them. The REST server assigns client ids at registration, so the file lists
keys, not ids (see ``SecAggClient``'s docstring for why a set of keys is enough).

The file, one key per line: 64 hex characters, then optionally whitespace and a free label::

    # federation "clinics", keys collected with python -m fl_client --print-verify-key
    3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29  clinic-a
    ...

Blank lines and lines starting with ``#`` are ignored. Each error names the file and the line.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fl_common.secagg import SigningIdentity

__all__ = ["IDENTITY_FILE", "format_verify_key", "load_or_create_identity", "load_trusted_keys", "write_private"]

#: the file in a daemon's state dir holding its long-term Ed25519 signing key (raw 32 bytes, 0600)
IDENTITY_FILE = "secagg_identity.key"
_KEY_HEX = 64
_WANT = f"expected {_KEY_HEX} hex characters (an Ed25519 verifying key)"


def write_private(path: Path, data: str | bytes) -> None:
    """Atomic, fsynced, owner-only write: state files hold keys and training residue."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_or_create_identity(state_dir: Path) -> tuple[SigningIdentity, bool]:
    """This client's long-term signing key from ``state_dir`` (made, 0600, when there is none): the daemon and
    ``--print-verify-key`` share it, so the key an operator pins is the key the daemon signs with. The flag is
    True when the key is new (the server must then learn it at a registration)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / IDENTITY_FILE
    if path.is_file():
        return SigningIdentity.ed25519(path.read_bytes()), False
    identity = SigningIdentity.generate_ed25519()
    write_private(path, identity.private_bytes())
    return identity, True


def format_verify_key(key: bytes) -> str:
    """A verifying key as a pinned-keys file holds it (lower-case hex)."""
    if len(key) != _KEY_HEX // 2:
        raise ValueError("an Ed25519 verifying key is exactly 32 bytes")
    return key.hex()


def _parse_key(token: str, where: str) -> bytes:
    """One line's key, checked as cryptography checks an Ed25519 public key."""
    if len(token) != _KEY_HEX:
        raise ValueError(f"{where}: {_WANT}, got {len(token)} characters")
    if any(c not in string.hexdigits for c in token):
        raise ValueError(f"{where}: {_WANT}, found a character that is not hex")
    key = bytes.fromhex(token)
    try:
        Ed25519PublicKey.from_public_bytes(key)
    except ValueError:
        raise ValueError(f"{where}: not an Ed25519 public key") from None
    return key


def load_trusted_keys(path: str | Path) -> frozenset[bytes]:
    """The pinned verifying keys in ``path``. ``ValueError`` (naming the file, and the line where there is
    one) for an unreadable file, a malformed line, a key listed twice (two clients sharing one identity, e.g.
    a copied state dir: every roster with both would be refused) or a file without keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the pinned-keys file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    first_line: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split(maxsplit=1)
        if not fields or fields[0].startswith("#"):
            continue
        key = _parse_key(fields[0], f"{path} line {number}")
        if key in first_line:
            raise ValueError(f"{path} line {number}: the key of line {first_line[key]} again (two clients with one identity?)")
        first_line[key] = number
    if not first_line:
        raise ValueError(f"{path}: no keys ({_WANT} per line)")
    return frozenset(first_line)
