"""The HTTP side of the protocol for a client: signing, encryption, retries with backoff.

``ServerApi`` turns protocol calls into signed ``requests`` calls. Transient failures
(connection errors, timeouts, 5xx, 429) are retried ``max_retries`` times with exponential
backoff and jitter; client errors (4xx) are not retried and surface as :class:`ApiRefused`
with the server's error code, because sending the same bad request again cannot help.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from fl_common.crypto import Envelope, KeyPair, derive_session_keys, sign_request
from fl_common.crypto.keys import SessionKeys
from fl_common.protocol.rest import (
    HEADER_IDEMPOTENCY,
    HEADER_MODEL_KEY,
    PATH_CKKS,
    PATH_MODEL,
    PATH_PROFILE,
    PATH_REGISTER,
    PATH_ROUND,
    PATH_SECAGG,
    PATH_TOKEN,
    PATH_UPDATE,
    QUERY_LIVENESS,
    QUERY_MODEL_VERSION,
    QUERY_SECAGG_ATTEMPT,
    QUERY_WAIT,
)

log = logging.getLogger("fl_client.api")


class ApiRefused(Exception):
    """The server answered with a 4xx: ``status``, ``code`` and ``message`` say why; ``data`` is the whole
    JSON body (secure aggregation adds ``dropped`` and ``phase``)."""

    def __init__(self, status: int, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.data = dict(data or {})


class ServerUnreachable(Exception):
    """Every retry failed with a transport error or a 5xx."""


@dataclass(repr=False)
class Credentials:
    client_id: str
    session_token: str
    token_expires_at: float
    keys: SessionKeys

    def to_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "session_token": self.session_token, "token_expires_at": self.token_expires_at,
                "fernet_key": self.keys.fernet_key.decode(), "hmac_key": base64.urlsafe_b64encode(self.keys.hmac_key).decode()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Credentials:
        return cls(d["client_id"], d["session_token"], float(d["token_expires_at"]),
                   SessionKeys(fernet_key=d["fernet_key"].encode(), hmac_key=base64.urlsafe_b64decode(d["hmac_key"])))

    def __repr__(self) -> str:
        return f"Credentials(client_id={self.client_id!r}, <secrets redacted>)"


def retry_delay(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...) of a request: exponential from 0.5 s, capped at 30 s, with
    +-50 % jitter so that clients cut off together do not come back in lockstep."""
    return min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())


class ServerApi:
    def __init__(self, base_url: str, *, timeout: float = 30.0, max_retries: int = 3, verify: bool | str = True,
                 sleep: Callable[[float], None] = time.sleep, stop: Callable[[], bool] = lambda: False) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.session = requests.Session()
        self.session.verify = verify
        self.creds: Credentials | None = None
        self._sleep = sleep
        self._stop = stop
        #: whether to long-poll at all (turned off for good when the server refuses a ``wait``)
        self.long_poll = True
        #: seconds a secure-aggregation GET may wait on the server for its phase (0: poll; the daemon sets it)
        self.secagg_wait = 0.0

    # ------------------------------------------------------------------ transport
    def _send(self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
              signed: bool = True, bearer: bool = True, json_body: Any = None, timeout: float | None = None,
              retries: int | None = None, stream: bool = False) -> requests.Response:
        """``timeout`` and ``retries`` default to the client's own (a long-poll needs a longer one and no retry).
        ``stream``: the body of a successful answer is left on the connection (:meth:`_get_body` reads it)."""
        max_retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            req = requests.Request(method, self.base_url + path, data=body if json_body is None else None, json=json_body,
                                   headers=dict(headers or {}))
            prepared = self.session.prepare_request(req)
            if signed:
                assert self.creds is not None
                raw = prepared.body if isinstance(prepared.body, bytes) else (prepared.body or "").encode()
                prepared.headers.update(sign_request(method, prepared.path_url, raw, client_id=self.creds.client_id,
                                                     hmac_key=self.creds.keys.hmac_key))
                if bearer:
                    prepared.headers["Authorization"] = f"Bearer {self.creds.session_token}"
            try:
                resp = self.session.send(prepared, timeout=self.timeout if timeout is None else timeout, stream=stream)
            # ChunkedEncodingError: the answer was cut short (a server killed while it wrote the body): as
            # unreachable as a refused connection, not a reason for the daemon to crash
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                error: str = type(exc).__name__
            else:
                if resp.status_code < 500 and resp.status_code != 429:
                    if resp.status_code >= 400:
                        try:
                            data = resp.json()
                        except ValueError:
                            raise ApiRefused(resp.status_code, "http_error", resp.text[:200]) from None
                        if not isinstance(data, dict):
                            raise ApiRefused(resp.status_code, "http_error", resp.text[:200])
                        raise ApiRefused(resp.status_code, str(data.get("error")), str(data.get("message")), data)
                    return resp
                error = f"HTTP {resp.status_code}"
                resp.close()
            attempt += 1
            if attempt > max_retries or self._stop():
                raise ServerUnreachable(f"{method} {path} failed after {attempt} attempt(s): {error}")
            delay = retry_delay(attempt)
            # DEBUG: the caller says once that the server is unreachable (fl_client/backoff.py), not once per try
            log.debug("%s %s failed (%s); retry %d/%d in %.1f s", method, path, error, attempt, self.max_retries, delay)
            self._sleep(delay)

    def _get_body(self, path: str, headers: dict[str, str] | None) -> tuple[requests.Response, bytes]:
        """A signed GET of a large body (the model), read in one piece. Why: ``Response.content`` reads in 10 KiB
        pieces, 10.5 ms of CPU for the cnn's 6.6 MB model against 1.9 ms for one read (every selected daemon pays
        it between a round's opening and its training; benchmarks/results/fast_rounds/README.md). A body cut short
        (urllib3 checks it against Content-Length) is asked for again, as a refused connection is."""
        attempt = 0
        while True:
            resp = self._send("GET", path, headers=headers, stream=True)
            try:
                return resp, resp.raw.read(decode_content=True)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                error = type(exc).__name__
            finally:
                resp.close()
            attempt += 1
            if attempt > self.max_retries or self._stop():
                raise ServerUnreachable(f"GET {path} failed after {attempt} attempt(s): {error} while reading the body")
            delay = retry_delay(attempt)
            log.debug("GET %s: the body was cut short (%s); retry %d/%d in %.1f s", path, error, attempt,
                      self.max_retries, delay)
            self._sleep(delay)

    # ------------------------------------------------------------------ protocol
    def register(self, enrollment_token: str, *, client_name: str | None, partition: int | None,
                 num_samples: int | None, capability: dict[str, float],
                 secagg_verify_key: bytes | None = None) -> dict[str, Any]:
        """``secagg_verify_key``: the client's long-term Ed25519 public key (secure aggregation checks every
        protocol message of this client against it)."""
        own = KeyPair.generate()
        body: dict[str, Any] = {"enrollment_token": enrollment_token, "public_key": own.public_b64, "client_name": client_name,
                                "partition": partition, "num_samples": num_samples, "capability": capability}
        if secagg_verify_key is not None:
            body["secagg_verify_key"] = base64.urlsafe_b64encode(secagg_verify_key).decode("ascii")
        # Registering again under a known name must prove possession of the identity: the request is
        # signed with the session keys of the previous registration (the server refuses an unsigned one).
        resp = self._send("POST", PATH_REGISTER, signed=self.creds is not None, bearer=False, json_body=body)
        data = resp.json()
        salt = base64.urlsafe_b64decode(data["salt"])
        keys = derive_session_keys(own, data["server_public_key"], client_id=data["client_id"], salt=salt, role="client")
        self.creds = Credentials(data["client_id"], data["session_token"], float(data["token_expires_at"]), keys)
        return data

    def refresh_token(self) -> None:
        assert self.creds is not None
        data = self._send("POST", PATH_TOKEN, bearer=False).json()
        self.creds.session_token = data["session_token"]
        self.creds.token_expires_at = float(data["token_expires_at"])

    def round_status(self) -> dict[str, Any]:
        return self._send("GET", PATH_ROUND).json()

    # ------------------------------------------------------------------ push: long-polls (fl_server/rest/state_changes.py)
    def poll_round(self, etag: str | None, wait: float, *, liveness: bool = False) -> tuple[dict[str, Any], str | None]:
        """The round status and its state ETag (None: the server does not long-poll, e.g. an older one).

        With ``etag`` (the last answer's) and ``wait`` > 0 the server holds the request until the state moves
        or ``wait`` s pass; with ``liveness`` (a training client's heartbeat) until this client's round or state
        moves (not at a secure phase change) or ``wait`` s pass. A long-poll that fails (a proxy that cuts idle
        requests, a refused ``wait``) falls back to a plain poll at once, so a long-poll never costs more than one
        missed push."""
        if etag is None or wait <= 0 or not self.long_poll:
            resp = self._send("GET", PATH_ROUND)
            return resp.json(), resp.headers.get("ETag")
        query = f"{QUERY_WAIT}={wait:g}" + (f"&{QUERY_LIVENESS}=1" if liveness else "")
        try:
            resp = self._send("GET", f"{PATH_ROUND}?{query}", headers={"If-None-Match": etag},
                              timeout=wait + self.timeout, retries=0)
        except (ServerUnreachable, ApiRefused) as exc:
            if isinstance(exc, ApiRefused) and exc.status != 400:
                raise  # 401 and the like: the caller renews its token, as for any poll
            log.info("long-poll failed (%s): polling instead", exc)
            self.long_poll = not isinstance(exc, ApiRefused)  # a refused wait will be refused again: stop asking
            resp = self._send("GET", PATH_ROUND)
        return resp.json(), resp.headers.get("ETag")

    def _secagg_waited(self, round_number: int, attempt: int, step: str) -> requests.Response:
        """GET a secure-aggregation step, parked on the server until its phase begins (``secagg_wait`` s, 0:
        a plain GET); a failed long-poll is tried again at once as a plain GET."""
        path = self._secagg_path(round_number, attempt, step)
        wait = self.secagg_wait if self.long_poll else 0.0
        if wait <= 0:
            return self._send("GET", path)
        try:
            return self._send("GET", f"{path}&{QUERY_WAIT}={wait:g}", timeout=wait + self.timeout, retries=0)
        except ServerUnreachable as exc:
            log.info("long-poll of %s failed (%s): polling instead", step, exc)
        except ApiRefused as exc:
            if exc.status != 400 or exc.code != "bad_wait":
                raise
            self.long_poll = False
        return self._send("GET", path)

    def profile_spec(self) -> dict[str, Any]:
        """What the server's selection policy reads from this client's profile (ProfileSpec)."""
        return self._send("GET", PATH_PROFILE).json()

    def send_profile(self, report: dict[str, Any]) -> dict[str, Any]:
        """Report records, capability and (when asked) the label histogram (ProfileReport)."""
        return self._send("POST", PATH_PROFILE, json_body=report).json()

    def download_model(self, etag: str | None, encrypted: bool,
                       version: int | None = None) -> tuple[bytes | None, str | None]:
        """The wire-packed global model, or ``None`` when the server answers 304 for ``etag``.

        ``version`` (asynchronous mode): the model version this client's job trains on, which may
        already be older than the server's current one."""
        path = PATH_MODEL if version is None else f"{PATH_MODEL}?{QUERY_MODEL_VERSION}={int(version)}"
        resp, content = self._get_body(path, {"If-None-Match": etag} if etag else None)
        if resp.status_code == 304:
            return None, etag
        assert self.creds is not None
        if not encrypted:
            return content, resp.headers.get("ETag")
        wrapped = resp.headers.get(HEADER_MODEL_KEY)
        if not wrapped:
            raise ApiRefused(resp.status_code, "missing_model_key", "the server sent an encrypted model without its key")
        model_key = Envelope(self.creds.keys).open(wrapped.encode("ascii"))
        return Envelope(model_key).open(content), resp.headers.get("ETag")

    def upload_update(self, round_number: int, packed: bytes, idempotency_key: str, encrypted: bool,
                      attempt: int | None = None) -> dict[str, Any]:
        """Upload an update (or, in a secure round, a masked upload for ``attempt``)."""
        assert self.creds is not None
        body = Envelope(self.creds.keys).seal(packed) if encrypted else packed
        path = PATH_UPDATE.format(round=round_number)
        if attempt is not None:
            path += f"?{QUERY_SECAGG_ATTEMPT}={int(attempt)}"
        resp = self._send("POST", path, body=body,
                          headers={HEADER_IDEMPOTENCY: idempotency_key, "Content-Type": "application/octet-stream"})
        return resp.json()

    # ------------------------------------------------------------------ secure aggregation
    def _secagg_path(self, round_number: int, attempt: int, step: str) -> str:
        return PATH_SECAGG.format(round=int(round_number), step=step) + f"?{QUERY_SECAGG_ATTEMPT}={int(attempt)}"

    def secagg_send(self, round_number: int, attempt: int, step: str, message: bytes, encrypted: bool) -> dict[str, Any]:
        """POST one protocol message (``step``: advertise, shares or unmask); identical retries are safe."""
        assert self.creds is not None
        body = Envelope(self.creds.keys).seal(message) if encrypted else message
        resp = self._send("POST", self._secagg_path(round_number, attempt, step), body=body,
                          headers={"Content-Type": "application/octet-stream"})
        return resp.json()

    def secagg_fetch(self, round_number: int, attempt: int, step: str, encrypted: bool) -> bytes:
        """GET one protocol message (``step``: roster, shares or unmask), decrypted; ApiRefused (409) before its phase."""
        assert self.creds is not None
        resp = self._secagg_waited(round_number, attempt, step)
        return Envelope(self.creds.keys).open(resp.content) if encrypted else resp.content

    # ------------------------------------------------------------------ CKKS aggregation (fl_client/ckks_session.py)
    def _ckks_path(self, round_number: int, attempt: int, step: str) -> str:
        return PATH_CKKS.format(round=int(round_number), step=step) + f"?{QUERY_SECAGG_ATTEMPT}={int(attempt)}"

    def ckks_send(self, round_number: int, attempt: int, step: str, message: bytes, encrypted: bool) -> dict[str, Any]:
        """POST one CKKS message (``step``: key or decrypted); identical retries are safe."""
        assert self.creds is not None
        body = Envelope(self.creds.keys).seal(message) if encrypted else message
        return self._send("POST", self._ckks_path(round_number, attempt, step), body=body,
                          headers={"Content-Type": "application/octet-stream"}).json()

    def ckks_fetch(self, round_number: int, attempt: int, step: str, encrypted: bool) -> bytes:
        """GET one CKKS message (``step``: key or sum), decrypted; ApiRefused (409 wrong_phase) before it exists."""
        assert self.creds is not None
        resp = self._send("GET", self._ckks_path(round_number, attempt, step))
        return Envelope(self.creds.keys).open(resp.content) if encrypted else resp.content

    def ckks_outcome(self, round_number: int, attempt: int) -> dict[str, Any]:
        """How a CKKS attempt ended: state open/closed/aborted, and whether this client's input is in the sum."""
        return self._send("GET", self._ckks_path(round_number, attempt, "outcome")).json()

    def secagg_outcome(self, round_number: int, attempt: int) -> dict[str, Any]:
        """How a secure attempt ended: state open/closed/aborted, and whether this client's input is in the sum."""
        return self._secagg_waited(round_number, attempt, "outcome").json()
