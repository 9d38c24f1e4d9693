"""The server's own secrets: enrollment token, admin token and the master secret.

Each comes from the environment (``FL_ENROLLMENT_TOKEN``, ``FL_ADMIN_TOKEN``,
``FL_SERVER_SECRET``) or, when unset, is generated once and kept in a 0600 file in the state
directory, whose path (never the value) is logged. Two keys are derived from the master secret
with HKDF under distinct labels: the pepper that session tokens are hashed with, and the key
that wraps each client's session keys at rest in SQLite, so a copy of the database alone yields
neither usable tokens nor client keys.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN

ENV_SERVER_SECRET = "FL_SERVER_SECRET"
log = logging.getLogger("fl_server.rest.secrets")


def _hkdf(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"federated-learning-hub/server", info=label).derive(secret)


def _from_env_or_file(env: str, path: Path, min_len: int = 16) -> str:
    value = os.environ.get(env)
    if value:
        if len(value) < min_len:
            raise ValueError(f"{env} must be at least {min_len} characters")
        return value
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    value = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    log.warning("%s is not set: generated one and stored it in %s (mode 0600)", env, path)
    return value


@dataclass(frozen=True, repr=False)
class ServerSecrets:
    enrollment_token: str
    admin_token: str
    token_pepper: bytes
    key_wrapping_key: bytes  # a Fernet key (urlsafe base64)

    @classmethod
    def load(cls, state_dir: Path) -> ServerSecrets:
        enrollment = _from_env_or_file(ENV_ENROLLMENT_TOKEN, state_dir / "enrollment_token")
        admin = _from_env_or_file(ENV_ADMIN_TOKEN, state_dir / "admin_token")
        master = _from_env_or_file(ENV_SERVER_SECRET, state_dir / "server_secret", min_len=32).encode("utf-8")
        return cls(enrollment, admin, _hkdf(master, b"token-pepper"),
                   base64.urlsafe_b64encode(_hkdf(master, b"client-key-wrapping")))

    def __repr__(self) -> str:
        return "ServerSecrets(<redacted>)"
