"""Who the client is: the REST driver's front door, shared by every round driver.

The :class:`ClientGateway` owns everything about a client that does not depend on how rounds
run: enrollment and registration, session tokens (stored as keyed hashes), the per-client keys
derived from an X25519 agreement (kept wrapped under the server's key-wrapping key), request
signatures with fresh nonces, data-partition assignment, selection profiles, and the opening of
an upload (decrypt, decode, check) before any round driver sees it. Its rules:

- Nothing an outside request says is trusted before it is authenticated (bearer token compared by
  keyed hash, HMAC signature with a fresh nonce) and checked. A refused request changes no state
  except the refusal counters and the audit log (:meth:`ClientGateway.refuse`).
- Registration of a known name keeps the client's id and partition and replaces its credentials;
  the round driver is told (``Registration.reregistered``), since the client lost its local state.

The round drivers (``sync_driver``, ``secure_driver``, ``async_driver``) use the public methods
below; none of them reaches into the gateway's members.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import math
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fl_common.config import ConfigError, FLConfig
from fl_common.crypto import (
    Envelope,
    EnvelopeError,
    KeyAgreementError,
    KeyPair,
    SignatureError,
    constant_time_equals,
    derive_session_keys,
    generate_token,
    hash_token,
    verify_request,
)
from fl_common.crypto.keys import SessionKeys
from fl_common.protocol import ClientUpdate
from fl_common.protocol.rest import PROTOCOL_VERSION, DataAssignment, RegisterResponse
from fl_common.tensors import wire
from fl_common.tensors.codecs import Codec, make_codec
from fl_server.rest.client_profiles import ProfileError, client_info, profile_spec, validate_profile
from fl_server.rest.refusals import RefusalRecorder
from fl_server.rest.secrets import ServerSecrets
from fl_server.selection import ClientInfo
from fl_server.store.sqlite import ClientRow, ServerStore
from fl_server.strategies import UpdateRejected, check_components, strategy_class
from fl_server.strategies.base import check_update

log = logging.getLogger("fl_server.rest.gateway")

#: the driver features of the three REST round drivers (plain and secure synchronous rounds, asynchronous jobs)
PLAIN_FEATURES = ("control_variates", "client_infos")
SECURE_FEATURES = (*PLAIN_FEATURES, "secure_aggregation")
#: CKKS rounds (fl_server/rest/ckks_driver.py); SCAFFOLD is refused under CKKS by the config
CKKS_FEATURES = ("client_infos", "ckks")
ASYNC_FEATURES = ("client_infos",)
MAX_NAME = 64
#: clients whose unwrapped session keys the gateway keeps (one entry per client; a busy server sees all of them)
KEY_CACHE_SIZE = 100_000
#: the largest record count a client may claim when the server cannot derive its partition's size:
#: it weights the average, so it is bounded (and it must fit SQLite's 64-bit integers)
MAX_RECORDS = 2**31 - 1
#: ``enrolled_by`` of clients that registered with the shared enrollment token
SHARED_ENROLLMENT = "shared"
#: config keys that describe simulated clients; a REST federation's clients are real
SIMULATION_ONLY_KEYS = ("client_speed_distribution", "client_speed_sigma", "client_seconds_per_sample", "network_delay",
                        "attack_fraction", "attack_noise_std", "client_test_fraction", "finetune_epochs", "local_only_epochs",
                        "local_only_test_samples")


class ApiError(Exception):
    """An error a client caused: HTTP status, machine code, one-line message, and ``extra`` fields for
    the JSON body (secure aggregation adds whether the client was dropped and the phase)."""

    def __init__(self, status: int, code: str, message: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra = dict(extra or {})


@dataclass
class Authenticated:
    """A request whose token and signature checked out: the client and its session keys."""

    client_id: str
    keys: SessionKeys


@dataclass(frozen=True)
class SignedRequest:
    """The parts of an HTTP request a signature covers (method, path with query, body, headers)."""

    method: str
    path: str
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Registration:
    """What a registration did, for the round driver: a known client that registered again lost its
    local state (an asynchronous job it held will not come back), and a changed verifying key cannot
    sign messages of a secure attempt planned with the old one."""

    response: RegisterResponse
    client_id: str
    partition_index: int | None
    reregistered: bool
    verify_key_changed: bool


@dataclass(frozen=True)
class UploadLayout:
    """How an upload's vector is laid out: the model delta, then (SCAFFOLD) the control-variate delta."""

    model_numel: int
    carries_control: bool = False

    @property
    def numel(self) -> int:
        return self.model_numel * (2 if self.carries_control else 1)

    def split(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(model delta, SCAFFOLD variate delta or None) of a decoded upload."""
        if not self.carries_control:
            return vector, None
        return vector[:self.model_numel], vector[self.model_numel:]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def rest_driver_features(cfg: FLConfig) -> tuple[str, ...]:
    """What the REST driver picked for ``cfg`` carries out beyond handing updates to the coordinator
    (fl_server/strategies/features.py DRIVER_FEATURES): the one place both drivers' tuples are named."""
    if cfg.training_mode == "async":
        return ASYNC_FEATURES
    if cfg.secure_aggregation and cfg.secure_aggregation_method == "ckks":
        return CKKS_FEATURES
    return SECURE_FEATURES if cfg.secure_aggregation else PLAIN_FEATURES


def check_rest_config(cfg: FLConfig) -> None:
    """What the REST driver cannot run is refused before a server starts, never ignored.

    Driver features (SCAFFOLD's variates) are checked by the coordinator; what is specific to the
    wire, and what only simulated clients have (speeds, attacks), is checked here: the asynchronous
    coordinator checks no driver features, so this is the one place both modes pass through.
    """
    check_components(cfg, rest_driver_features(cfg))  # strategy, selection, plug-ins; the attack refusal too
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for key in SIMULATION_ONLY_KEYS:
        if getattr(cfg, key) != defaults[key]:
            raise ConfigError(f"config key '{key}' has value {getattr(cfg, key)!r}: it applies to simulated clients only (python "
                              f"-m fl_server simulate: speeds, attacks, held-out splits, fine-tuning); a REST federation's clients "
                              f"are real processes with their own data: remove '{key}'")
    if strategy_class(cfg).needs_client_state and cfg.compression and make_codec(cfg.codec).biased:
        raise ConfigError(f"config key 'codec' has value {cfg.codec!r}: a biased codec (top-k) would sparsify SCAFFOLD's "
                          f"control-variate deltas too, which error feedback does not cover; use codec int8, float16 or none")


def parse_verify_key(value: Any) -> str | None:
    """A registration's ``secagg_verify_key``: None, or the canonical urlsafe base64 of a 32-byte Ed25519
    public key. Checked here so that a key the protocol could never verify is refused at registration
    (400), not discovered as a bad signature in the middle of a round."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if value is None:
        return None
    error = ApiError(400, "bad_secagg_verify_key", "secagg_verify_key must be the urlsafe base64 of a 32-byte Ed25519 "
                     "public key")
    if not isinstance(value, str) or len(value) > 64:
        raise error
    try:
        raw = base64.urlsafe_b64decode(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):  # binascii.Error is a ValueError
        raise error from None
    if len(raw) != 32:
        raise error
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise error from None
    return base64.urlsafe_b64encode(raw).decode("ascii")


class ClientGateway:
    """Registration, authentication, profiles and the opening of uploads, for every round driver.

    ``lock`` is the service's one lock (shared with the round driver): registration changes the
    client table and partition assignment under it. ``wake`` nudges the round ticker after a change
    that may let a round open (a registration, a profile)."""

    def __init__(self, cfg: FLConfig, store: ServerStore, secrets_: ServerSecrets, *, clock: Callable[[], float],
                 lock: threading.RLock, wake: threading.Event, model_info: dict[str, Any],
                 partition_sizes: list[int] | None = None, known_sizes: list[int] | None = None,
                 secagg_required: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.secrets = secrets_
        self.clock = clock
        self.lock = lock
        self.wake = wake
        self.model_info = model_info
        #: sample-level DP: the record count of every configured partition (None otherwise)
        self.partition_sizes = partition_sizes
        #: the record count of every partition when the server could derive it (bounds num_samples), else None
        self.known_sizes = known_sizes if known_sizes is not None else partition_sizes
        self.shared_limit = cfg.shared_enrollment_max_clients if cfg.shared_enrollment_max_clients is not None \
            else cfg.num_clients
        self.secagg_required = secagg_required
        self.codec: Codec = make_codec(cfg.codec if cfg.compression else "none")
        self._key_wrapper = Envelope(self.secrets.key_wrapping_key)
        # A client's keys unwrapped once, not twice per request: unwrapping (an authenticated decryption and a JSON
        # parse) was ~0.3 ms of every signed request's ~1.5 ms, all under the one worker's GIL (issue 12). Keyed by
        # the wrapped bytes themselves, so keys a client replaces at registration are a new entry, never a stale
        # hit; revocation is checked on the row at every request as before. The keys are in this process's memory
        # while it serves the client anyway; what stays wrapped is the copy on disk.
        self._unwrap_keys = functools.lru_cache(maxsize=KEY_CACHE_SIZE)(self._unwrap_keys_uncached)
        self.refusals = RefusalRecorder(store, clock, retention_days=cfg.audit_retention_days, max_events=cfg.audit_max_events)

    @property
    def codec_name(self) -> str:
        return self.codec.name if self.cfg.compression else "none"

    # ------------------------------------------------------------------ refusals
    def refuse(self, reason: str, client_id: str | None, detail: str) -> None:
        """Count and audit a refused request: the only state a refusal may change (at a bounded cost:
        fl_server/rest/refusals.py)."""
        self.refusals.refuse(reason, client_id, detail)

    def reject_update(self, reason: str, client_id: str) -> None:
        self.refuse(f"update_{reason}", client_id, f"update refused: {reason}")

    # ------------------------------------------------------------------ registration and auth
    def _enrollment(self, token: Any, remote: str) -> tuple[str, str | None]:
        """(enrolled_by, the name a per-client token is bound to) of a registration's enrollment token.

        The shared token (one per federation) enrols up to ``shared_enrollment_max_clients`` clients;
        an admin-issued token (``POST /api/v1/enrollments``) is stored hashed, may be bound to one
        client name, expires, and enrols as many clients as it has uses (one by default)."""
        if isinstance(token, str) and 16 <= len(token) <= 200:
            if constant_time_equals(token, self.secrets.enrollment_token):
                return SHARED_ENROLLMENT, None
            row = self.store.enrollment_by_hash(hash_token(token, self.secrets.token_pepper))
            if row is not None and row["revoked_at"] is None and row["uses"] < row["max_uses"] and \
                    (row["expires_at"] is None or row["expires_at"] > self.clock()):
                return str(row["enrollment_id"]), row["client_name"]
        self.refuse("bad_enrollment_token", None, f"registration refused from {remote or 'unknown'}")
        raise ApiError(401, "bad_enrollment_token", "the enrollment token is missing, wrong, used up, expired or revoked")

    def _prove_possession(self, existing: ClientRow, request: SignedRequest | None) -> None:
        """A known client name registers again only with a request signed by that client's current key
        (or after an admin removed it): a shared enrollment token alone must not take over an identity."""
        if existing.revoked_at is not None:
            self.refuse("revoked_client", existing.client_id, "registration of a revoked client's name refused")
            raise ApiError(403, "client_revoked", f"client '{existing.name}' was revoked by an admin; an admin must remove "
                           f"it before the name can register again")
        # .keys(): werkzeug's Headers iterates (name, value) pairs, not names
        names = {str(k).lower() for k in request.headers.keys()} if request is not None else set()  # noqa: SIM118
        if request is None or "x-fl-signature" not in names:
            self.refuse("takeover_refused", existing.client_id, "unsigned registration of a known client name")
            raise ApiError(409, "client_exists", f"client '{existing.name}' is already registered: register again with a "
                           f"request signed by its current key, or ask an admin to remove it (python -m fl_server admin "
                           f"clients remove {existing.client_id})")

        def only_this_client(client_id: str) -> bytes | None:
            return self._keys_of(existing).hmac_key if client_id == existing.client_id else None

        try:
            verify_request(request.method, request.path, request.body, request.headers, hmac_key=only_this_client,
                           nonce_cache=self.store, clock=self.clock)
        except SignatureError as exc:
            self.refuse(f"signature_{exc.reason}", existing.client_id, f"re-registration of '{existing.name}': {exc.reason}")
            raise ApiError(401, f"signature_{exc.reason}", f"re-registration signature refused: "
                           f"{exc.reason.replace('_', ' ')}") from None

    def bound_records(self, partition_index: int | None, reported: int | None) -> int:
        """The most records a client may claim: its partition's size when the server can derive it
        (it assigns the partitions), else what it reported at registration, else :data:`MAX_RECORDS`."""
        if self.known_sizes is not None and partition_index is not None and 0 <= partition_index < len(self.known_sizes):
            return self.known_sizes[partition_index]
        return reported if reported is not None else MAX_RECORDS

    def register(self, body: Mapping[str, Any], remote: str = "", request: SignedRequest | None = None) -> Registration:
        enrolled_by, bound_name = self._enrollment(body.get("enrollment_token"), remote)
        name = body.get("client_name")
        if name is not None and (not isinstance(name, str) or not (1 <= len(name) <= MAX_NAME)
                                 or not all(c.isalnum() or c in "-_." for c in name)):
            raise ApiError(400, "bad_client_name", f"client_name must be 1-{MAX_NAME} characters of letters, digits, - _ .")
        partition = body.get("partition")
        if partition is not None and (isinstance(partition, bool) or not isinstance(partition, int)
                                      or not 0 <= partition < self.cfg.num_clients):
            raise ApiError(400, "bad_partition", f"partition must be an integer in [0, {self.cfg.num_clients})")
        if bound_name is not None and name != bound_name:
            raise ApiError(403, "enrollment_name_mismatch", "this enrollment token is issued for another client_name")
        num_samples = body.get("num_samples")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                        or not 1 <= num_samples <= MAX_RECORDS):
            raise ApiError(400, "bad_num_samples", f"num_samples must be an integer in [1, {MAX_RECORDS}]")
        capability = body.get("capability") or {}
        if not isinstance(capability, dict) or len(capability) > 16 or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for k, v in capability.items()):
            raise ApiError(400, "bad_capability", "capability must map up to 16 names to non-negative numbers")
        public_key = body.get("public_key")
        if not isinstance(public_key, str) or len(public_key) > 100:
            raise ApiError(400, "bad_public_key", "public_key must be an urlsafe-base64 X25519 public key")
        verify_key = parse_verify_key(body.get("secagg_verify_key"))
        if verify_key is None and self.secagg_required:
            raise ApiError(400, "secagg_verify_key_required", "this server runs secure aggregation: register with "
                           "secagg_verify_key, the urlsafe base64 of the client's long-term Ed25519 public key")

        with self.lock:
            now = self.clock()
            existing = self.store.client_by_name(name) if name else None
            if existing is not None:
                self._prove_possession(existing, request)
            client_id = existing.client_id if existing else f"c-{secrets.token_hex(8)}"
            server_keys = KeyPair.generate()
            salt = secrets.token_bytes(32)
            try:
                keys = derive_session_keys(server_keys, public_key, client_id=client_id, salt=salt, role="server")
            except (KeyAgreementError, ValueError):
                raise ApiError(400, "bad_public_key", "public_key is not a valid X25519 public key") from None
            session = generate_token()
            token_hash = hash_token(session, self.secrets.token_pepper)
            expires = now + self.cfg.session_ttl
            wrapped = self._key_wrapper.seal(json.dumps({"f": keys.fernet_key.decode(), "h": _b64(keys.hmac_key)}).encode())
            if existing:
                if partition is not None and existing.partition_index != partition:
                    raise ApiError(409, "partition_conflict", f"client '{name}' already holds partition {existing.partition_index}")
                index = existing.partition_index
            else:
                index = self._assign_partition(partition)  # 409 federation_full first: nothing is written before
                if enrolled_by == SHARED_ENROLLMENT and self.store.count_enrolled_by(SHARED_ENROLLMENT) >= self.shared_limit:
                    self.refuse("enrollment_limit", None, f"shared enrollment token used up ({self.shared_limit} clients)")
                    raise ApiError(403, "enrollment_limit", f"the shared enrollment token has enrolled its "
                                   f"{self.shared_limit} clients (shared_enrollment_max_clients); ask an admin for a "
                                   f"per-client token")
            if self.partition_sizes is not None and index is not None and num_samples is not None \
                    and num_samples != self.partition_sizes[index]:
                raise ApiError(409, "num_samples_mismatch", f"partition {index} holds {self.partition_sizes[index]} records, "
                               f"the client reports {num_samples}; sample-level DP is planned from the partition's size")
            if num_samples is not None and num_samples > self.bound_records(index, None):
                raise ApiError(422, "num_samples_too_large", f"partition {index} holds {self.bound_records(index, None)} "
                               f"records; the client reports {num_samples}")
            if existing is None and enrolled_by != SHARED_ENROLLMENT and not self.store.use_enrollment(enrolled_by, now):
                raise ApiError(401, "bad_enrollment_token", "the enrollment token is used up, expired or revoked")
            key_changed = existing is not None and existing.secagg_verify_key != verify_key
            if existing:
                self.store.replace_client_credentials(client_id, token_hash, expires, wrapped, capability, num_samples, now,
                                                      verify_key)
            else:
                self.store.add_client(ClientRow(client_id, name, token_hash, expires, wrapped, index, num_samples, capability,
                                                now, now, 0, {}, secagg_verify_key=verify_key), enrolled_by=enrolled_by)
            self.store.security_event("registered", client_id, f"name={name or '-'} partition={index} enrolled_by="
                                      f"{enrolled_by} again={'yes' if existing else 'no'} from {remote or '-'}")
        log.info("client %s registered (name %s, partition %s)", client_id, name or "-", index)
        self.wake.set()
        response = RegisterResponse(
            client_id=client_id, session_token=session, token_expires_at=expires, server_public_key=server_keys.public_b64,
            salt=_b64(salt), poll_interval=self.cfg.poll_interval, protocol_version=PROTOCOL_VERSION,
            data=self._assignment(index), model=self.model_info, codec=self.codec_name,
            wire_compression=self.cfg.wire_compression, encryption=self.cfg.encryption,
        )
        return Registration(response, client_id, index, reregistered=existing is not None, verify_key_changed=key_changed)

    def _assign_partition(self, requested: int | None) -> int | None:
        used = self.store.used_partitions()
        if requested is not None:
            if requested in used:
                raise ApiError(409, "partition_taken", f"partition {requested} is already assigned to another client")
            return requested
        free = [i for i in range(self.cfg.num_clients) if i not in used]
        if not free:
            raise ApiError(409, "federation_full", f"all {self.cfg.num_clients} partitions are assigned (num_clients)")
        return free[0]

    def _assignment(self, index: int | None) -> DataAssignment | None:
        if index is None:
            return None
        c = self.cfg
        return DataAssignment(c.dataset, index, c.num_clients, c.partition_method, c.non_iid_alpha, c.seed, c.samples_per_client,
                              c.shards_per_client, c.max_train_samples)

    def _keys_of(self, row: ClientRow) -> SessionKeys:
        return self._unwrap_keys(row.wrapped_keys)

    def _unwrap_keys_uncached(self, wrapped: bytes) -> SessionKeys:
        data = json.loads(self._key_wrapper.open(wrapped))
        return SessionKeys(fernet_key=data["f"].encode(), hmac_key=base64.urlsafe_b64decode(data["h"]))

    def token_holder(self, method: str, path: str, headers: Mapping[str, str]) -> ClientRow:
        """The client whose bearer session token a request carries (keyed-hash lookup, expiry, revocation).

        Headers only: routes call this before they read a body, so a caller without a valid token
        cannot make the server buffer one (up to ``max_update_bytes``)."""
        auth = headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or len(auth) > 200:
            self.refuse("missing_token", None, f"{method} {path} without a bearer token")
            raise ApiError(401, "missing_token", "an 'Authorization: Bearer <session token>' header is required")
        row = self.store.client_by_token_hash(hash_token(auth[7:].strip(), self.secrets.token_pepper))
        if row is None:
            self.refuse("bad_token", None, f"{method} {path} with an unknown session token")
            raise ApiError(401, "bad_token", "the session token is not valid; register again")
        self._check_not_revoked(row)
        if row.token_expires < self.clock():
            self.refuse("expired_token", row.client_id, f"{method} {path} with an expired session token")
            raise ApiError(401, "expired_token", "the session token has expired; refresh it at /api/v1/token")
        return row

    def _check_not_revoked(self, row: ClientRow) -> None:
        if row.revoked_at is not None:
            self.refuse("revoked_client", row.client_id, "request of a revoked client")
            raise ApiError(403, "client_revoked", "this client was revoked by an admin")

    def verify_signature(self, holder: ClientRow | None, method: str, path: str, body: bytes,
                         headers: Mapping[str, str]) -> Authenticated:
        """The HMAC signature (freshness, no replay) of a request, by ``holder`` (its token checked) or, for
        the token refresh that needs no token, by whichever registered client the signature names."""

        def key_lookup(client_id: str) -> bytes | None:
            if holder is not None:
                return self._keys_of(holder).hmac_key if holder.client_id == client_id else None
            r = self.store.client(client_id)
            return None if r is None else self._keys_of(r).hmac_key

        try:
            client_id = verify_request(method, path, body, headers, hmac_key=key_lookup, nonce_cache=self.store,
                                       clock=self.clock)
        except SignatureError as exc:
            self.refuse(f"signature_{exc.reason}", holder.client_id if holder else None, f"{method} {path}: {exc.reason}")
            raise ApiError(401, f"signature_{exc.reason}", f"request signature refused: {exc.reason.replace('_', ' ')}") from None
        row = holder if holder is not None else self.store.client(client_id)
        assert row is not None
        self._check_not_revoked(row)
        self.store.touch_client(client_id, self.clock())
        return Authenticated(client_id, self._keys_of(row))

    def authenticate(self, method: str, path: str, body: bytes, headers: Mapping[str, str], *,
                     require_token: bool = True) -> Authenticated:
        """Bearer session token, then the HMAC signature (both steps at once, for callers holding the body)."""
        holder = self.token_holder(method, path, headers) if require_token else None
        return self.verify_signature(holder, method, path, body, headers)

    def refresh_token(self, auth: Authenticated) -> dict[str, Any]:
        session = generate_token()
        expires = self.clock() + self.cfg.session_ttl
        self.store.update_token(auth.client_id, hash_token(session, self.secrets.token_pepper), expires)
        self.store.security_event("token_refreshed", auth.client_id, "session token renewed")
        return {"session_token": session, "token_expires_at": expires}

    def is_admin(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header carries the admin token (constant-time)."""
        return authorization.startswith("Bearer ") and constant_time_equals(authorization[7:].strip(),
                                                                            self.secrets.admin_token)

    # ------------------------------------------------------------------ administration
    def _client_or_404(self, client_id: str) -> ClientRow:
        row = self.store.client(client_id) if isinstance(client_id, str) and len(client_id) <= 64 else None
        if row is None:
            raise ApiError(404, "unknown_client", f"no client {client_id!r} is registered")
        return row

    def revoke_client(self, client_id: str) -> dict[str, Any]:
        row = self._client_or_404(client_id)
        revoked = self.store.revoke_client(client_id, self.clock())
        if revoked:
            self.store.security_event("client_revoked", client_id, f"revoked by an admin (name {row.name or '-'})")
            log.warning("client %s revoked by an admin", client_id)
        return {"client_id": client_id, "revoked": True, "already": not revoked}

    def create_enrollment(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """An admin-issued enrollment token: shown once, stored as a keyed hash, optionally bound to a name."""
        name = body.get("client_name")
        if name is not None and (not isinstance(name, str) or not (1 <= len(name) <= MAX_NAME)
                                 or not all(c.isalnum() or c in "-_." for c in name)):
            raise ApiError(400, "bad_client_name", f"client_name must be 1-{MAX_NAME} characters of letters, digits, - _ .")
        uses = body.get("uses", 1)
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= 100_000:
            raise ApiError(400, "bad_uses", "uses must be an integer in [1, 100000]")
        if name is not None and uses != 1:
            raise ApiError(400, "bad_uses", "a token bound to one client_name has exactly one use")
        ttl = body.get("expires_in_s")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl)
                                or not 60 <= ttl <= 365 * 86400):
            raise ApiError(400, "bad_expires_in_s", "expires_in_s must be a number of seconds in [60, 31536000]")
        now = self.clock()
        token = generate_token()
        enrollment_id = f"e-{secrets.token_hex(6)}"
        self.store.add_enrollment(enrollment_id, hash_token(token, self.secrets.token_pepper), name, uses, now,
                                  None if ttl is None else now + float(ttl))
        self.store.security_event("enrollment_created", None, f"{enrollment_id} for {name or 'any name'}, {uses} use(s)")
        return {"enrollment_id": enrollment_id, "enrollment_token": token, "client_name": name, "uses": uses,
                "expires_at": None if ttl is None else now + float(ttl)}

    def enrollments(self) -> list[dict[str, Any]]:
        """Issued enrollment tokens (never the tokens themselves), with their use counts."""
        return [{**e, "registered": self.store.count_enrolled_by(e["enrollment_id"])} for e in self.store.enrollments()]

    def revoke_enrollment(self, enrollment_id: str) -> dict[str, Any]:
        if not any(e["enrollment_id"] == enrollment_id for e in self.store.enrollments()):
            raise ApiError(404, "unknown_enrollment", f"no enrollment {enrollment_id!r}")
        revoked = self.store.revoke_enrollment(enrollment_id, self.clock())
        if revoked:
            self.store.security_event("enrollment_revoked", None, enrollment_id)
        return {"enrollment_id": enrollment_id, "revoked": True, "already": not revoked}

    # ------------------------------------------------------------------ client profiles (selection)
    def profile(self, auth: Authenticated) -> dict[str, Any]:
        """GET /api/v1/profile: what the selection policy wants to know, and what this client reported."""
        row = self.store.client(auth.client_id)
        return profile_spec(self.cfg, row.profile if row is not None else None).to_json()

    def set_profile(self, auth: Authenticated, body: Any) -> dict[str, Any]:
        """POST /api/v1/profile: validate and store a client's profile. A refused report changes
        nothing but the refusal counters and the audit log."""
        row = self.store.client(auth.client_id)
        assert row is not None  # authenticated
        size = None
        if self.partition_sizes is not None and row.partition_index is not None:
            size = self.partition_sizes[row.partition_index]  # sample-level DP plans from it, as at registration
        try:
            profile = validate_profile(self.cfg, body, partition_size=size)
        except ProfileError as exc:
            self.refuse(f"profile_{exc.code}", auth.client_id, f"profile refused: {exc.message}")
            raise ApiError(exc.status, exc.code, exc.message) from None
        profile["reported_at"] = self.clock()
        capability = {**row.capability, **profile["capability"]}
        with self.lock:
            self.store.set_profile(auth.client_id, profile, profile["num_samples"], capability)
        self.store.security_event("profile", auth.client_id, f"num_samples={profile['num_samples']} capability="
                                  f"{json.dumps(profile['capability'], sort_keys=True)} label_histogram="
                                  f"{'yes' if 'label_histogram' in profile else 'no'}")
        self.wake.set()
        return {"accepted": True, "profile": profile}

    # ------------------------------------------------------------------ who may be selected
    def live_clients(self) -> list[str]:
        return self.store.live_client_ids(self.clock() - self.cfg.client_liveness)

    def selection_candidates(self, live: list[str]) -> tuple[list[str], dict[str, ClientInfo] | None]:
        """The live clients the selection policy may draw, with what it knows of them.

        ``uniform`` draws among all live clients and reads nothing (infos None). Every other policy
        reads the clients' profiles, so a live client whose profile has not arrived is not a
        candidate yet (see fl_server/rest/client_profiles.py)."""
        if self.cfg.selection == "uniform":
            return live, None
        profiles = self.store.profiles()
        infos = {cid: info for cid in live if (info := client_info(cid, profiles.get(cid))) is not None}
        return [cid for cid in live if cid in infos], infos

    def clients(self) -> list[dict[str, Any]]:
        """The admin's client table."""
        now = self.clock()
        participation = self.store.participation()
        return [{
            "client_id": c.client_id, "name": c.name, "partition": c.partition_index, "num_samples": c.num_samples,
            "capability": c.capability, "registered_at": c.registered_at, "last_seen_s_ago": round(now - c.last_seen, 1),
            "online": now - c.last_seen <= self.cfg.client_liveness, "rounds_participated": c.rounds_participated,
            "dropped": participation.get(c.client_id, {}).get("dropped", 0), "last_metrics": c.last_metrics,
            "profile": c.profile,
        } for c in self.store.clients()]

    # ------------------------------------------------------------------ uploads
    def check_idempotency_key(self, client_id: str, idempotency_key: str) -> None:
        if not idempotency_key or len(idempotency_key) > 128 or not all(c.isalnum() or c in "-_.:" for c in idempotency_key):
            self.reject_update("bad_idempotency_key", client_id)
            raise ApiError(400, "bad_idempotency_key", "an Idempotency-Key header of 1-128 characters [A-Za-z0-9-_.:] is required")

    def open_bytes(self, auth: Authenticated, body: bytes) -> bytes:
        """The plaintext of a request body (Fernet under the client's key when the server encrypts)."""
        return Envelope(auth.keys).open(body) if self.cfg.encryption else body

    def seal_for(self, auth: Authenticated, data: bytes) -> bytes:
        """A response body for one client: encrypted under its key when the server encrypts."""
        return Envelope(auth.keys).seal(data) if self.cfg.encryption else data

    def open_update(self, auth: Authenticated, round_number: int, body: bytes,
                    layout: UploadLayout) -> tuple[bytes, ClientUpdate]:
        """Decrypt, decode and check a plain upload: (wire-packed bytes, the update), or ApiError (audited)."""
        try:
            packed = self.open_bytes(auth, body)
        except EnvelopeError:
            self.reject_update("bad_ciphertext", auth.client_id)
            raise ApiError(400, "bad_ciphertext", "the update could not be decrypted with this client's key") from None
        try:
            vector, meta = wire.decode_update(packed, layout.numel, max_bytes=self.cfg.max_update_bytes)
        except ValueError as exc:
            self.reject_update("bad_payload", auth.client_id)
            raise ApiError(422, "bad_payload", f"the update payload is malformed: {exc}") from None
        num_samples = meta.get("num_samples")
        metrics = meta.get("metrics", {})
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            self.reject_update("bad_num_samples", auth.client_id)
            raise ApiError(422, "bad_num_samples", "the update's num_samples must be a positive integer")
        bound = self.records_bound_of(auth.client_id)
        if num_samples > bound:  # it weights the average: one client must not take all the weight
            self.reject_update("num_samples_too_large", auth.client_id)
            raise ApiError(422, "num_samples_too_large", f"the update claims {num_samples} records; this client's "
                           f"partition holds at most {bound}")
        if not isinstance(metrics, dict) or len(metrics) > 32 or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in metrics.items()):
            self.reject_update("bad_metrics", auth.client_id)
            raise ApiError(422, "bad_metrics", "metrics must map up to 32 names to finite numbers")
        delta, control = layout.split(vector)
        update = ClientUpdate(auth.client_id, round_number, delta, num_samples, {k: float(v) for k, v in metrics.items()},
                              len(body), control_delta=control)
        try:
            check_update(update, layout.model_numel)
        except UpdateRejected as exc:
            self.reject_update(exc.reason, auth.client_id)
            raise ApiError(422, exc.reason, str(exc)) from None
        return packed, update

    def records_bound_of(self, client_id: str) -> int:
        """:meth:`bound_records` of a registered client (its partition, else its reported count)."""
        row = self.store.client(client_id)
        if row is None:
            return MAX_RECORDS
        return self.bound_records(row.partition_index, None) if self.known_sizes is not None else \
            min(MAX_RECORDS, row.num_samples or MAX_RECORDS)

    def decode_stored(self, data: bytes, layout: UploadLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A durable update's payload file, decoded again on recovery: (model delta, variate delta)."""
        vector, _ = wire.decode_update(data, layout.numel, max_bytes=self.cfg.max_update_bytes)
        return layout.split(vector)


__all__ = ["ApiError", "Authenticated", "ClientGateway", "MAX_RECORDS", "Registration", "SIMULATION_ONLY_KEYS", "SignedRequest",
           "UploadLayout",
           "check_rest_config", "parse_verify_key"]
