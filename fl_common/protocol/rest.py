"""The REST protocol, version 1: paths, headers and JSON bodies shared by server and client.

Flow of one client (every request after registration is authenticated twice: a bearer session
token, and an HMAC-SHA256 signature from ``fl_common.crypto.signing`` with the per-client key)::

    POST {API}/register          enrollment token + client X25519 public key
                                 -> client id, session token, server public key + salt
                                    (both sides derive Fernet + HMAC keys with HKDF),
                                    partition assignment, dataset description, poll interval
    POST {API}/token             (signed) -> a fresh session token when the old one expires
    GET  {API}/round             (signed) -> RoundStatus: waiting / selected / not_selected / finished
    GET  {API}/profile           (signed) -> what the server's selection policy wants to know
                                    (ProfileSpec) and what this client reported so far
    POST {API}/profile           (signed) ProfileReport: records, capability (compute_speed in
                                    samples/s, bandwidth in bytes/s) and, only when asked, the
                                    (Laplace-noised) label histogram -> 200; under a selection
                                    policy other than uniform a client is selected only once its
                                    profile has arrived
    GET  {API}/model             (signed) -> Fernet_k(wire-packed global vector) with header
                                    X-FL-Model-Key: Fernet_client(k); ETag = model version;
                                    If-None-Match with the current version -> 304.
                                    Asynchronous mode: ``?version=V`` asks for the version a job
                                    trains on (409 version_gone once no job needs it)
    POST {API}/rounds/{r}/update (signed, Idempotency-Key) body = Fernet(wire-packed update)
                                 -> 202 accepted (a retry with the same key answers 202 again
                                    and is counted once); 409 not selected / round closed.
                                    Asynchronous mode: r is the model version the job trained on;
                                    409 not_dispatched / wrong_version / too_stale / finished
    GET  /status, /health, {API}/clients (admin bearer token), {API}/openapi.json

Secure aggregation (``secure_aggregation: true``; fl_common/secagg). A client registers its
long-term Ed25519 verifying key (``secagg_verify_key``). When selected, ``GET {API}/round`` carries
a ``secagg`` block (the attempt id, the round's public parameters, the client's index, the phase
and its deadline). Every body below is the message's ``to_bytes()``, Fernet-encrypted under the
client's session key when the server encrypts, and every path takes ``?attempt=ID`` (a message for
an attempt that is no longer open is refused with 409 and changes nothing)::

    POST {API}/rounds/{r}/secagg/advertise   AdvertiseKeys                     -> 200
    GET  {API}/rounds/{r}/secagg/roster      -> RosterMessage (409 until phase share_keys)
    POST {API}/rounds/{r}/secagg/shares      ShareKeys                         -> 200
    GET  {API}/rounds/{r}/secagg/shares      -> ShareBundle (409 until phase masked_input)
    POST {API}/rounds/{r}/update             MaskedUpload(MaskedInput, clear DP metrics) -> 202
    GET  {API}/rounds/{r}/secagg/unmask      -> UnmaskRequest (409 until phase unmask)
    POST {API}/rounds/{r}/secagg/unmask      UnmaskResponse                    -> 200
    GET  {API}/rounds/{r}/secagg/outcome     -> {"state": open|closed|aborted, "in_sum": bool, ...}

Refusals are ``{"error", "message", "dropped", "phase"}``: 400 malformed (or a check that failed),
403 bad signature, 409 wrong phase / not in phase / conflicting duplicate / attempt closed; an
identical retry of an accepted message is answered like the first one in every phase.

Errors are JSON ``{"error": code, "message": text}`` with a 4xx status.
Binary bodies are ``application/octet-stream``: "Fernet" above means fl_common.crypto.Envelope, a
Fernet token for bodies under 64 KiB and an AES-256-GCM bulk token (``FLB1``, key derived from the
same Fernet key) from 64 KiB on - models and updates - because Fernet's base64 + CBC + HMAC passes
cost ~30x GCM's on multi-megabyte bodies. With ``encryption: false`` they are the
wire-packed bytes themselves (for debugging only; the server logs a warning at start-up).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

API_PREFIX = "/api/v1"
PROTOCOL_VERSION = 1

PATH_REGISTER = f"{API_PREFIX}/register"
PATH_TOKEN = f"{API_PREFIX}/token"
PATH_ROUND = f"{API_PREFIX}/round"
#: ``?wait=S`` on GET round and the secure-phase GETs: a long-poll answered as soon as the state changes
QUERY_WAIT = "wait"
#: ``?liveness=1`` with ``wait`` on GET round: a training client's heartbeat (fl_client/heartbeat.py), answered when
#: the client's round or state moves (or at the wait), not at every secure phase change: it only needs to be heard
#: from, and waking ten of them at each of the two phase changes while they train cost a request and an answer each
QUERY_LIVENESS = "liveness"
PATH_MODEL = f"{API_PREFIX}/model"
PATH_UPDATE = API_PREFIX + "/rounds/{round}/update"
PATH_CLIENTS = f"{API_PREFIX}/clients"
PATH_ENROLLMENTS = f"{API_PREFIX}/enrollments"
PATH_PROFILE = f"{API_PREFIX}/profile"
PATH_OPENAPI = f"{API_PREFIX}/openapi.json"
#: secure aggregation, one path per protocol step (``step`` in SECAGG_STEPS), ``?attempt=ID``
PATH_SECAGG = API_PREFIX + "/rounds/{round}/secagg/{step}"
SECAGG_STEPS = ("advertise", "roster", "shares", "unmask", "outcome")
#: CKKS aggregation, one path per protocol step (fl_server/rest/ckks_driver.py), ``?attempt=ID``
PATH_CKKS = API_PREFIX + "/rounds/{round}/ckks/{step}"
QUERY_SECAGG_ATTEMPT = "attempt"
#: the largest secure-aggregation protocol message (keys, shares, unmask responses) a server reads;
#: the masked input goes through the update route and its own limit (max_update_bytes)
MAX_SECAGG_MESSAGE_BYTES = 8 * 2**20

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

#: The capability names the selection policies read (fl_server/selection, ClientInfo):
#: samples of local training per second, and bytes per second of the client's link.
CAPABILITY_COMPUTE_SPEED = "compute_speed"
CAPABILITY_BANDWIDTH = "bandwidth"
CAPABILITY_NAMES = (CAPABILITY_COMPUTE_SPEED, CAPABILITY_BANDWIDTH)
#: Profile fields (ProfileSpec.required / optional)
PROFILE_NUM_SAMPLES = "num_samples"
PROFILE_LABEL_HISTOGRAM = "label_histogram"
#: Limits of a profile report: larger values are refused (400), they cannot be real
MAX_PROFILE_SAMPLES = 10**9
MAX_CAPABILITY_VALUE = 1e15
MAX_PROFILE_BYTES = 64 * 1024
#: The query parameter of the model download naming the version an asynchronous job trains on
QUERY_MODEL_VERSION = "version"


@dataclass
class RegisterRequest:
    enrollment_token: str
    public_key: str  # urlsafe base64 X25519 public key of the client
    client_name: str | None = None  # a stable name; re-registering the same name keeps its partition
    partition: int | None = None  # None: server assigns (``--partition auto``); an int asks for that index
    num_samples: int | None = None  # for clients that bring their own data (--data-dir)
    capability: dict[str, float] = field(default_factory=dict)  # e.g. {"compute": 1.0, "bandwidth": 1.0}
    #: urlsafe base64 of the client's long-term Ed25519 verifying key (32 bytes); required by a server
    #: that runs secure aggregation, which checks every protocol message of the client against it
    secagg_verify_key: str | None = None


@dataclass
class DataAssignment:
    """What a client needs to rebuild its own shard of the configured dataset on its own."""

    dataset: str
    partition_index: int
    num_clients: int
    method: str
    alpha: float
    seed: int
    samples_per_client: int | None
    shards_per_client: int
    max_train_samples: int | None


@dataclass
class RegisterResponse:
    client_id: str
    session_token: str
    token_expires_at: float
    server_public_key: str
    salt: str  # urlsafe base64, the HKDF salt for this client's session keys
    poll_interval: float
    protocol_version: int
    data: DataAssignment | None
    model: dict[str, Any]  # model_type, num_classes, hidden_size, ... (enough to build the same model)
    codec: str
    wire_compression: str
    encryption: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoundStatus:
    state: str
    round: int | None
    model_version: int
    poll_after: float
    deadline: float | None = None  # seconds since the epoch (server clock)
    instructions: dict[str, Any] | None = None  # TrainInstructions.to_json() when selected
    #: asynchronous mode only: the job id of a dispatched job (``round`` is then the model version
    #: to download with ``?version=`` and to upload for); None in synchronous rounds
    job: int | None = None
    #: secure aggregation only: {"attempt", "params" (SecAggParams.to_json()), "index", "phase",
    #: "deadline" (server clock), "deadline_in_s", "dropped", "done"} for a selected client
    secagg: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.job is None:  # synchronous replies keep the version-1 shape exactly
            del out["job"]
        if self.secagg is None:
            del out["secagg"]
        return out


@dataclass
class ProfileSpec:
    """``GET {API}/profile``: what this server's selection policy reads from a client's profile.

    ``required`` fields must be in a report (422 otherwise); ``optional`` ones are read when sent.
    A label histogram the policy does not ask for is refused (400), so a client never discloses a
    statistic of its data that the server does not use: only ``stratified`` selection by label asks
    for it, and then Laplace-noised with ``label_histogram_epsilon`` when that is set."""

    policy: str
    required: list[str]
    optional: list[str]
    num_classes: int
    label_histogram_epsilon: float | None
    #: whether selection waits for the profile (every policy but uniform)
    needed_for_selection: bool
    #: what this client reported last (None: nothing yet)
    profile: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProfileReport:
    """``POST {API}/profile``: sent by a client once it has loaded its data (and again on restart)."""

    num_samples: int
    capability: dict[str, float] = field(default_factory=dict)  # CAPABILITY_NAMES only
    label_histogram: list[float] | None = None  # only when ProfileSpec asks for it

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.label_histogram is None:
            del out["label_histogram"]
        return out


# --------------------------------------------------------------------------- masked uploads
#: a secure round's upload: this magic, a 4-byte big-endian header length, a JSON header
#: {"metrics": {...}} (only the metrics the server may see in the clear: the DP-SGD plan numbers that
#: sample-level accounting checks, and timing), then ``MaskedInput.to_bytes()`` unchanged
MASKED_UPLOAD_MAGIC = b"FLMU1\n"
#: the only metrics a client sends next to a masked input (the server drops any other): the DP-SGD
#: plan it was told (sample-level accounting checks it) and timing; training loss travels masked
MASKED_UPLOAD_METRICS = ("dp_sample_rate", "dp_steps", "steps", "seconds")
_MAX_MASKED_HEADER = 4096


def pack_masked_upload(masked_input: bytes, metrics: dict[str, float]) -> bytes:
    """The body of ``POST {API}/rounds/{r}/update`` in a secure round (before Fernet)."""
    header = json.dumps({"metrics": {k: float(v) for k, v in sorted(metrics.items())}}, separators=(",", ":")).encode()
    if len(header) > _MAX_MASKED_HEADER:
        raise ValueError("too many clear metrics for a masked upload")
    return MASKED_UPLOAD_MAGIC + struct.pack(">I", len(header)) + header + masked_input


def unpack_masked_upload(body: bytes) -> tuple[dict[str, float], memoryview]:
    """(clear metrics, MaskedInput bytes) of a masked upload; ValueError when it is not one. The bytes are a
    read-only view into ``body``, not a copy: a masked input is megabytes, and the server's route hands them on
    to ``MaskedInput.from_bytes``, which keeps viewing them."""
    start = len(MASKED_UPLOAD_MAGIC) + 4
    if not body.startswith(MASKED_UPLOAD_MAGIC) or len(body) < start:
        raise ValueError("not a masked upload (bad magic)")
    (hlen,) = struct.unpack(">I", body[len(MASKED_UPLOAD_MAGIC):start])
    if hlen > _MAX_MASKED_HEADER or start + hlen > len(body):
        raise ValueError("bad masked-upload header length")
    try:
        header = json.loads(body[start:start + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the masked-upload header is not JSON") from None
    metrics = header.get("metrics") if isinstance(header, dict) else None
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in metrics.items()):
        raise ValueError("masked-upload metrics must map names to finite numbers")
    return {k: float(v) for k, v in metrics.items()}, memoryview(bytes(body) if not isinstance(body, bytes) else body)[
        start + hlen:]
