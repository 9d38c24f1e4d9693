"""The REST protocol, version 1: paths, headers and JSON bodies shared by server and client.

Flow of one client (every request after registration is authenticated twice: a bearer session
token, and an HMAC-SHA256 signature from ``fl_common.crypto.signing`` with the per-client key)::

    POST {API}/register          enrollment token + client X25519 public key
                                 -> client id, session token, server public key + salt
                                    (both sides derive Fernet + HMAC keys with HKDF),
                                    partition assignment, dataset description, poll interval
    POST {API}/token             (signed) -> a fresh session token when the old one expires
    GET  {API}/round             (signed) -> RoundStatus: waiting / selected / not_selected / finished
    GET  {API}/model             (signed) -> Fernet_k(wire-packed global vector) with header
                                    X-FL-Model-Key: Fernet_client(k); ETag = model version;
                                    If-None-Match with the current version -> 304
    POST {API}/rounds/{r}/update (signed, Idempotency-Key) body = Fernet(wire-packed update)
                                 -> 202 accepted (a retry with the same key answers 202 again
                                    and is counted once); 409 not selected / round closed
    GET  /status, /health, {API}/clients (admin bearer token), {API}/openapi.json

Errors are JSON ``{"error": code, "message": text}`` with a 4xx status.
Binary bodies are ``application/octet-stream``; with ``encryption: false`` they are the
wire-packed bytes themselves (for debugging only; the server logs a warning at start-up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

API_PREFIX = "/api/v1"
PROTOCOL_VERSION = 1

PATH_REGISTER = f"{API_PREFIX}/register"
PATH_TOKEN = f"{API_PREFIX}/token"
PATH_ROUND = f"{API_PREFIX}/round"
PATH_MODEL = f"{API_PREFIX}/model"
PATH_UPDATE = API_PREFIX + "/rounds/{round}/update"
PATH_CLIENTS = f"{API_PREFIX}/clients"
PATH_OPENAPI = f"{API_PREFIX}/openapi.json"

HEADER_IDEMPOTENCY = "Idempotency-Key"
HEADER_MODEL_VERSION = "X-FL-Model-Version"
#: the model download's key, Fernet-encrypted for the requesting client (the body is encrypted
#: once per model version under that key: hybrid encryption, see FederationService.model_payload)
HEADER_MODEL_KEY = "X-FL-Model-Key"
AUTHORIZATION = "Authorization"  # "Bearer <session token>"
ENV_ENROLLMENT_TOKEN = "FL_ENROLLMENT_TOKEN"
ENV_ADMIN_TOKEN = "FL_ADMIN_TOKEN"

ROUND_WAITING = "waiting"
ROUND_SELECTED = "selected"
ROUND_NOT_SELECTED = "not_selected"
ROUND_SUBMITTED = "submitted"
ROUND_FINISHED = "finished"


@dataclass
class RegisterRequest:
    enrollment_token: str
    public_key: str  # urlsafe base64 X25519 public key of the client
    client_name: Optional[str] = None  # a stable name; re-registering the same name keeps its partition
    partition: Optional[int] = None  # None: server assigns (``--partition auto``); an int asks for that index
    num_samples: Optional[int] = None  # for clients that bring their own data (--data-dir)
    capability: dict[str, float] = field(default_factory=dict)  # e.g. {"compute": 1.0, "bandwidth": 1.0}


@dataclass
class DataAssignment:
    """What a client needs to rebuild its own shard of the configured dataset on its own."""

    dataset: str
    partition_index: int
    num_clients: int
    method: str
    alpha: float
    seed: int
    samples_per_client: Optional[int]
    shards_per_client: int
    max_train_samples: Optional[int]


@dataclass
class RegisterResponse:
    client_id: str
    session_token: str
    token_expires_at: float
    server_public_key: str
    salt: str  # urlsafe base64, the HKDF salt for this client's session keys
    poll_interval: float
    protocol_version: int
    data: Optional[DataAssignment]
    model: dict[str, Any]  # model_type, num_classes, hidden_size, ... (enough to build the same model)
    codec: str
    wire_compression: str
    encryption: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoundStatus:
    state: str
    round: Optional[int]
    model_version: int
    poll_after: float
    deadline: Optional[float] = None  # seconds since the epoch (server clock)
    instructions: Optional[dict[str, Any]] = None  # TrainInstructions.to_json() when selected

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
