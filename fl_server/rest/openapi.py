"""The OpenAPI 3.0 description of the REST API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from fl_common.protocol.rest import (
    CAPABILITY_NAMES,
    MAX_CAPABILITY_VALUE,
    MAX_PROFILE_SAMPLES,
    PATH_CKKS,
    PATH_CLIENTS,
    PATH_ENROLLMENTS,
    PATH_MODEL,
    PATH_OPENAPI,
    PATH_PROFILE,
    PATH_REGISTER,
    PATH_ROUND,
    PATH_SECAGG,
    PATH_TOKEN,
    PROTOCOL_VERSION,
    QUERY_LIVENESS,
    QUERY_MODEL_VERSION,
    QUERY_SECAGG_ATTEMPT,
)
from fl_server.rest.state_changes import MAX_WAIT_SECONDS, QUERY_WAIT

_SIGNED: list[dict[str, list[str]]] = [{"session": [], "signature": []}]
_CLIENT_ID = {"name": "client_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _ERR for c in codes}


#: the largest round number a path takes (fits SQLite's integers with room to spare)
MAX_ROUND_IN_PATH = 2**31 - 1
#: a round number in a path; anything else there (a sign, letters, a larger number) matches no route: 404
_ROUND = {"name": "round", "in": "path", "required": True,
          "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ROUND_IN_PATH}}


def _wait_param(what: str) -> dict[str, Any]:
    """``?wait=S`` (fl_server/rest/state_changes.py): park the request until there is news, at most S seconds."""
    return {"name": QUERY_WAIT, "in": "query", "required": False,
            "description": f"long-poll: seconds (decimal, 0 to {MAX_WAIT_SECONDS:g}; at most half the server's "
                           f"client_liveness is used) the server may hold the request until {what}; any other value "
                           "is refused with 400 bad_wait. A server that does not long-poll answers at once.",
            "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS}}


def _secagg_params() -> list[dict[str, Any]]:
    return [_ROUND,
            {"name": QUERY_SECAGG_ATTEMPT, "in": "query", "required": False,
             "description": "the attempt id from the round status's secagg block (an aborted attempt is followed by a new "
                            "one with the same round number); a message for an attempt that is not open gets 409 "
                            "attempt_closed and changes nothing", "schema": {"type": "integer", "minimum": 1, "maximum": 10**12 - 1}}]



_PROTOCOL_BODY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_PROTOCOL_BODY_DOC = ("Envelope of the message's bytes: a Fernet token under 64 KiB, an AES-256-GCM bulk token (FLB1) from "
                      "64 KiB on (with encryption: false, the bytes themselves)")


def _secagg_paths() -> dict[str, Any]:
    """The secure-aggregation steps (fl_server/rest/secure_driver.py); bodies are fl_common.secagg messages' to_bytes()."""
    def post(summary: str) -> dict[str, Any]:
        return {"summary": summary, "security": _SIGNED, "parameters": _secagg_params(),
                "requestBody": {"required": True, "description": _PROTOCOL_BODY_DOC, "content": _PROTOCOL_BODY},
                "responses": {"200": {"description": "accepted (also an identical retry, in any phase)",
                                      "content": _json("SecAggAccepted")}, **_errors(400, 401, 403, 404, 409, 411, 413)}}

    def get(summary: str) -> dict[str, Any]:
        return {"summary": summary, "security": _SIGNED,
                "parameters": [*_secagg_params(), _wait_param("the phase that serves this message begins (instead of "
                                                              "409 wrong_phase)")],
                "responses": {"200": {"description": f"the message: {_PROTOCOL_BODY_DOC}", "content": _PROTOCOL_BODY},
                              **_errors(400, 401, 404, 409)}}

    def path(step: str) -> str:
        return PATH_SECAGG.format(round="{round}", step=step)

    return {
        path("advertise"): {"post": post("Secure aggregation, phase 0: AdvertiseKeys (two fresh X25519 public keys, signed "
                                         "with the client's registered Ed25519 key)")},
        path("roster"): {"get": get("The roster (U1's keys and signatures); 409 wrong_phase until phase share_keys")},
        path("shares"): {"post": post("Phase 1: ShareKeys (one AES-GCM ciphertext of Shamir shares per neighbour, signed)"),
                         "get": get("The ShareBundle addressed to this client, and U2; 409 wrong_phase until phase "
                                    "masked_input. The masked input itself goes to /api/v1/rounds/{round}/update as a "
                                    "MaskedUpload (FLMU1 header with the clear DP metrics, then MaskedInput bytes)")},
        path("consistency"): {"get": get("The ConsistencyCheck (U3, and U2 minus U3) to sign; 409 wrong_phase until phase "
                                         "consistency_check"),
                              "post": post("Phase 3: ConsistencySignature (the client's Ed25519 signature on that set, "
                                           "bound to round and attempt; one set per attempt)")},
        path("unmask"): {"get": get("The UnmaskRequest (U3, U2 minus U3, and the survivors' signatures on them); 409 "
                                    "wrong_phase until phase unmask"),
                         "post": post("Phase 4: UnmaskResponse (shares of survivors' self-mask seeds and of dropped "
                                      "clients' mask keys, signed)")},
        path("outcome"): {"get": {"summary": "How a secure attempt ended, and whether this client's input is in the applied "
                                             "sum", "security": _SIGNED,
                                  "parameters": [*_secagg_params(), _wait_param("the attempt is no longer open")],
                                  "responses": {"200": {"description": "outcome", "content": _json("SecAggOutcome")},
                                                **_errors(400, 401, 404, 409)}}},
    }


def _ckks_paths() -> dict[str, Any]:
    """The CKKS steps (fl_server/rest/ckks_driver.py); bodies are fl_common.he messages' to_bytes(). A server that
    does not run CKKS answers them 404 ckks_off. No ``wait``: a client polls the round for the next phase."""
    def post(summary: str) -> dict[str, Any]:
        return {"summary": summary, "security": _SIGNED, "parameters": _secagg_params(),
                "requestBody": {"required": True, "description": _PROTOCOL_BODY_DOC, "content": _PROTOCOL_BODY},
                "responses": {"200": {"description": "accepted (also an identical retry)", "content": _json("CKKSAccepted")},
                              **_errors(400, 401, 403, 404, 409, 411, 413)}}

    def get(summary: str) -> dict[str, Any]:
        return {"summary": summary, "security": _SIGNED, "parameters": _secagg_params(),
                "responses": {"200": {"description": f"the message: {_PROTOCOL_BODY_DOC}", "content": _PROTOCOL_BODY},
                              **_errors(400, 401, 403, 404, 409)}}

    def path(step: str) -> str:
        return PATH_CKKS.format(round="{round}", step=step)

    return {
        path("key"): {"post": post("CKKS, phase public_key: the round's decryptor posts the fresh public key of the attempt "
                                   "(403 not_decryptor for anyone else)"),
                      "get": get("The attempt's CKKS public key, to encrypt the update under; 409 wrong_phase until the "
                                 "decryptor posted it. The ciphertexts themselves go to /api/v1/rounds/{round}/update as an "
                                 "FLMU1 upload (clear DP metrics, then EncryptedInput bytes)")},
        path("sum"): {"get": get("The ciphertext sum of the attempt's inputs, for the decryptor only (403 not_decryptor); "
                                 "409 wrong_phase until phase decrypt")},
        path("decrypted"): {"post": post("CKKS, phase decrypt: the decryptor's decryption of the sum; the server applies it "
                                         "as the round's aggregate")},
        path("outcome"): {"get": {"summary": "How a CKKS attempt ended, and whether this client's input is in the applied sum",
                                  "security": _SIGNED, "parameters": _secagg_params(),
                                  "responses": {"200": {"description": "outcome", "content": _json("SecAggOutcome")},
                                                **_errors(400, 401, 404, 409)}}},
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Federated Learning Hub", "version": str(PROTOCOL_VERSION),
                 "description": "Registration, round polling, model download and update upload. Every call after "
                                "registration carries a bearer session token and an HMAC-SHA256 signature "
                                "(X-FL-Client, X-FL-Timestamp, X-FL-Nonce, X-FL-Content-SHA256, X-FL-Signature) "
                                "over method, path, timestamp, nonce, body hash and client id; a nonce is accepted "
                                "once within a 5-minute window. "
                                "Binary bodies are envelopes of the wire format (Fernet under 64 KiB, AES-256-GCM above)."},
        "paths": {
            PATH_REGISTER: {"post": {
                "summary": "Register with the enrollment token and an X25519 public key",
                "requestBody": {"required": True, "content": _json("RegisterRequest")},
                "responses": {"201": {"description": "registered", "content": _json("RegisterResponse")},
                              **_errors(400, 401, 403, 409, 411, 413, 422)}}},
            PATH_TOKEN: {"post": {"summary": "Renew the session token (signature only)", "security": [{"signature": []}],
                                  "responses": {"200": {"description": "new token"}, **_errors(401)}}},
            PATH_ROUND: {"get": {"summary": "Poll the current round; with ?wait=S and If-None-Match a long-poll",
                                 "security": _SIGNED,
                                 "parameters": [_wait_param("the state clients see (a round opens or closes, a secure "
                                                            "phase changes) moves past the version in If-None-Match; "
                                                            "without If-None-Match the poll is answered at once"),
                                                {"name": "If-None-Match", "in": "header", "required": False,
                                                 "description": "the ETag of the last round status this client read",
                                                 "schema": {"type": "string"}},
                                                {"name": QUERY_LIVENESS, "in": "query", "required": False,
                                                 "description": "1: a training client's heartbeat; with wait the "
                                                                "request is held until this client's round or state "
                                                                "moves (a round opens or closes), not when a secure "
                                                                "phase changes, or until the wait is over; any other "
                                                                "value is refused with 400 bad_liveness",
                                                 "schema": {"type": "string", "enum": ["1"]}}],
                                 "responses": {"200": {"description": "round status; its ETag header is the state version "
                                                                      "(synchronous rounds only)",
                                                       "headers": {"ETag": {"schema": {"type": "string"}}},
                                                       "content": _json("RoundStatus")},
                                               **_errors(400, 401)}}},
            PATH_PROFILE: {
                "get": {"summary": "What the selection policy reads from a client's profile, and what this client reported",
                        "security": _SIGNED,
                        "responses": {"200": {"description": "profile spec", "content": _json("ProfileSpec")},
                                      **_errors(401)}},
                "post": {"summary": "Report records, capability and (only when asked, Laplace-noised when configured) the label "
                                    "histogram; under a selection policy other than uniform a client is selected only after this",
                         "security": _SIGNED,
                         "requestBody": {"required": True, "content": _json("ProfileReport")},
                         "responses": {"200": {"description": "stored"}, **_errors(400, 401, 409, 411, 413, 422)}}},
            PATH_MODEL: {"get": {"summary": "Download the global model (encrypted wire format)", "security": _SIGNED,
                                 "parameters": [{"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                                                {"name": QUERY_MODEL_VERSION, "in": "query", "required": False,
                                                 "description": "training_mode async: the model version the client's job trains on "
                                                                "(default: the current one)",
                                                 "schema": {"type": "integer", "minimum": 0, "maximum": 10**9 - 1}}],
                                 "responses": {"200": {"description": "model", "content": {"application/octet-stream": {}}},
                                               "304": {"description": "unchanged since the given ETag"},
                                               **_errors(400, 401, 409)}}},
            "/api/v1/rounds/{round}/update": {"post": {
                "summary": "Upload an update for a round (encrypted wire format); in training_mode async {round} is the model "
                           "version the job trained on and the 202 body says applied or buffered, with the staleness",
                "security": _SIGNED,
                "parameters": [_ROUND,
                               {"name": "Idempotency-Key", "in": "header", "required": True,
                                "schema": {"type": "string", "maxLength": 128}}],
                "requestBody": {"required": True, "content": {"application/octet-stream": {}}},
                "responses": {"202": {"description": "accepted (also for a retry with the same Idempotency-Key)"},
                              **_errors(400, 401, 403, 404, 409, 411, 413, 422)}}},
            **_secagg_paths(),
            **_ckks_paths(),
            "/status": {"get": {"summary": "Run summary (public, no secrets)", "responses": {"200": {"description": "status"}}}},
            "/health": {"get": {"summary": "Whether the federation can make progress",
                                "responses": {"200": {"description": "ok"},
                                              "503": {"description": "degraded: the round ticker keeps failing, or the open "
                                                      "round is far past its deadline (reason in the body)"}}}},
            PATH_CLIENTS: {"get": {"summary": "Registered clients (admin)", "security": [{"admin": []}],
                                   "responses": {"200": {"description": "clients"}, **_errors(401)}}},
            f"{PATH_CLIENTS}/{{client_id}}/revoke": {"post": {
                "summary": "Revoke a client (admin): it can no longer authenticate nor re-register by name",
                "security": [{"admin": []}], "parameters": [_CLIENT_ID],
                "responses": {"200": {"description": "revoked"}, **_errors(401, 404, 411, 413)}}},
            f"{PATH_CLIENTS}/{{client_id}}": {"delete": {
                "summary": "Remove a client and erase its stored rows and update files (admin); its contribution to "
                           "models already aggregated cannot be erased", "security": [{"admin": []}],
                "parameters": [_CLIENT_ID], "responses": {"200": {"description": "erased"}, **_errors(401, 404, 413)}}},
            PATH_ENROLLMENTS: {
                "get": {"summary": "Issued enrollment tokens, without the tokens (admin)", "security": [{"admin": []}],
                        "responses": {"200": {"description": "enrollments"}, **_errors(401)}},
                "post": {"summary": "Issue a per-client enrollment token (admin): shown once, stored hashed",
                         "security": [{"admin": []}], "requestBody": {"required": True, "content": _json("EnrollmentRequest")},
                         "responses": {"201": {"description": "the token"}, **_errors(400, 401, 411, 413)}}},
            f"{PATH_ENROLLMENTS}/{{enrollment_id}}": {"delete": {
                "summary": "Revoke an enrollment token (admin)", "security": [{"admin": []}],
                "parameters": [{"name": "enrollment_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "revoked"}, **_errors(401, 404, 413)}}},
            "/api/v1/audit": {"get": {"summary": "Security audit log (admin), newest first", "security": [{"admin": []}],
                                      "parameters": [{"name": "limit", "in": "query", "required": False,
                                                      "schema": {"type": "integer", "minimum": 1, "maximum": 10000,
                                                                 "default": 200}}],
                                      "responses": {"200": {"description": "events"}, **_errors(400, 401)}}},
            PATH_OPENAPI: {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        },
        "components": {
            "securitySchemes": {
                "session": {"type": "http", "scheme": "bearer"},
                "admin": {"type": "http", "scheme": "bearer"},
                "signature": {"type": "apiKey", "in": "header", "name": "X-FL-Signature"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"],
                          "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                                         "dropped": {"type": "boolean", "description": "secure aggregation: whether this "
                                                     "client is now out of the attempt (400 malformed or failed check, 403 "
                                                     "bad_signature, 409 wrong_phase / not_in_phase / conflicting_duplicate "
                                                     "/ attempt_closed)"},
                                         "phase": {"type": "string", "nullable": True,
                                                   "description": "secure aggregation: the attempt's phase"},
                                         "deadline_in_s": {"type": "number", "description": "secure aggregation: seconds "
                                                           "left in the phase"}}},
                "SecAggAccepted": {"type": "object", "properties": {
                    "accepted": {"type": "boolean"}, "round": {"type": "integer"}, "attempt": {"type": "integer"},
                    "dropped": {"type": "boolean"}, "phase": {"type": "string"}, "deadline_in_s": {"type": "number"},
                    "duplicate": {"type": "boolean", "description": "masked upload only: a retry of an accepted one"}}},
                "CKKSAccepted": {"type": "object", "properties": {
                    "accepted": {"type": "boolean"}, "duplicate": {"type": "boolean"},
                    "phase": {"type": "string", "enum": ["public_key", "inputs", "decrypt", "done", "aborted"]},
                    "deadline_in_s": {"type": "number"}}},
                "SecAggOutcome": {"type": "object", "properties": {
                    "round": {"type": "integer"}, "attempt": {"type": "integer"},
                    "state": {"type": "string", "enum": ["open", "closed", "aborted"]}, "reason": {"type": "string",
                                                                                                 "nullable": True},
                    "in_sum": {"type": "boolean"}}},
                "SecAggStatus": {"type": "object", "description": "secure aggregation (masking, or CKKS when method is "
                                 "ckks): present when this client is in the open attempt", "properties": {
                    "method": {"type": "string", "enum": ["ckks"], "description": "ckks: a CKKS attempt (absent: masking)"},
                    "attempt": {"type": "integer"}, "params": {"type": "object", "description": "SecAggParams.to_json(), or "
                                                               "CKKSParams.to_json() in a CKKS attempt"},
                    "index": {"type": "integer", "minimum": 1}, "phase": {"type": "string", "enum": [
                        "advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask", "public_key", "inputs",
                        "decrypt", "done", "aborted"]},
                    "decryptor": {"type": "boolean", "description": "CKKS: whether this client decrypts the attempt's sum"},
                    "deadline": {"type": "number"}, "deadline_in_s": {"type": "number"}, "poll_after": {"type": "number"},
                    "dropped": {"type": "boolean"}, "done": {"type": "boolean"}}},
                "EnrollmentRequest": {"type": "object", "additionalProperties": False, "properties": {
                    "client_name": {"type": "string", "maxLength": 64, "nullable": True,
                                    "description": "bind the token to this name (absent or null: any name)"},
                    "uses": {"type": "integer", "minimum": 1, "maximum": 100000, "description": "registrations it allows "
                             "(1 when bound to a name)"},
                    "expires_in_s": {"type": "number", "minimum": 60, "maximum": 31536000}}},
                "RegisterRequest": {"type": "object", "required": ["enrollment_token", "public_key"], "properties": {
                    "enrollment_token": {"type": "string"}, "public_key": {"type": "string"},
                    "client_name": {"type": "string", "maxLength": 64}, "partition": {"type": "integer", "minimum": 0},
                    "num_samples": {"type": "integer", "minimum": 1},
                    "capability": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
                    "secagg_verify_key": {"type": "string", "description": "urlsafe base64 of the client's long-term "
                                          "Ed25519 public key (32 bytes); required when the server runs secure aggregation"}}},
                "RegisterResponse": {"type": "object", "properties": {
                    "client_id": {"type": "string"}, "session_token": {"type": "string"}, "token_expires_at": {"type": "number"},
                    "server_public_key": {"type": "string"}, "salt": {"type": "string"}, "poll_interval": {"type": "number"},
                    "protocol_version": {"type": "integer"}, "data": {"type": "object", "nullable": True},
                    "model": {"type": "object"}, "codec": {"type": "string"}, "wire_compression": {"type": "string"},
                    "encryption": {"type": "boolean"}}},
                "RoundStatus": {"type": "object", "properties": {
                    "state": {"type": "string", "enum": ["waiting", "selected", "not_selected", "submitted", "finished"]},
                    "round": {"type": "integer", "nullable": True}, "model_version": {"type": "integer"},
                    "poll_after": {"type": "number"}, "deadline": {"type": "number", "nullable": True},
                    "instructions": {"type": "object", "nullable": True},
                    "job": {"type": "integer", "description": "training_mode async only: the job id; round is then the model "
                                                              "version to train on"},
                    "secagg": {"$ref": "#/components/schemas/SecAggStatus"}}},
                "ProfileSpec": {"type": "object", "properties": {
                    "policy": {"type": "string"}, "required": {"type": "array", "items": {"type": "string"}},
                    "optional": {"type": "array", "items": {"type": "string"}}, "num_classes": {"type": "integer"},
                    "label_histogram_epsilon": {"type": "number", "nullable": True},
                    "needed_for_selection": {"type": "boolean"}, "profile": {"type": "object", "nullable": True}}},
                "ProfileReport": {"type": "object", "required": ["num_samples"], "additionalProperties": False, "properties": {
                    "num_samples": {"type": "integer", "minimum": 1, "maximum": MAX_PROFILE_SAMPLES},
                    "capability": {"type": "object", "additionalProperties": False, "properties": {
                        name: {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": MAX_CAPABILITY_VALUE,
                               "description": "samples per second of local training" if name == "compute_speed"
                               else "bytes per second of the client's link"} for name in CAPABILITY_NAMES}},
                    "label_histogram": {"type": "array", "items": {"type": "number", "minimum": 0}, "nullable": True,
                                        "description": "num_classes counts; only when ProfileSpec asks for it (null: "
                                                       "not sent)"}}},
            },
        },
    }
