"""The OpenAPI 3.0 description of the REST API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from fl_common.protocol.rest import (
    CAPABILITY_NAMES,
    MAX_CAPABILITY_VALUE,
    MAX_PROFILE_SAMPLES,
    PATH_CLIENTS,
    PATH_MODEL,
    PATH_OPENAPI,
    PATH_PROFILE,
    PATH_REGISTER,
    PATH_ROUND,
    PATH_TOKEN,
    PROTOCOL_VERSION,
    QUERY_MODEL_VERSION,
)

_SIGNED = [{"session": [], "signature": []}]
_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _ERR for c in codes}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Federated Learning Hub", "version": str(PROTOCOL_VERSION),
                 "description": "Registration, round polling, model download and update upload. Every call after "
                                "registration carries a bearer session token and an HMAC-SHA256 signature "
                                "(X-FL-Client, X-FL-Timestamp, X-FL-Nonce, X-FL-Content-SHA256, X-FL-Signature) "
                                "over method, path, timestamp, nonce, body hash and client id; a nonce is accepted "
                                "once within a 5-minute window. Binary bodies are Fernet tokens of the wire format."},
        "paths": {
            PATH_REGISTER: {"post": {
                "summary": "Register with the enrollment token and an X25519 public key",
                "requestBody": {"required": True, "content": _json("RegisterRequest")},
                "responses": {"201": {"description": "registered", "content": _json("RegisterResponse")},
                              **_errors(400, 401, 409)}}},
            PATH_TOKEN: {"post": {"summary": "Renew the session token (signature only)", "security": [{"signature": []}],
                                  "responses": {"200": {"description": "new token"}, **_errors(401)}}},
            PATH_ROUND: {"get": {"summary": "Poll the current round", "security": _SIGNED,
                                 "responses": {"200": {"description": "round status", "content": _json("RoundStatus")},
                                               **_errors(401)}}},
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
                                                                "(default: the current one)", "schema": {"type": "integer", "minimum": 0}}],
                                 "responses": {"200": {"description": "model", "content": {"application/octet-stream": {}}},
                                               "304": {"description": "unchanged since the given ETag"},
                                               **_errors(400, 401, 409)}}},
            "/api/v1/rounds/{round}/update": {"post": {
                "summary": "Upload an update for a round (encrypted wire format); in training_mode async {round} is the model "
                           "version the job trained on and the 202 body says applied or buffered, with the staleness",
                "security": _SIGNED,
                "parameters": [{"name": "round", "in": "path", "required": True, "schema": {"type": "integer"}},
                               {"name": "Idempotency-Key", "in": "header", "required": True,
                                "schema": {"type": "string", "maxLength": 128}}],
                "requestBody": {"required": True, "content": {"application/octet-stream": {}}},
                "responses": {"202": {"description": "accepted (also for a retry with the same Idempotency-Key)"},
                              **_errors(400, 401, 409, 411, 413, 422)}}},
            "/status": {"get": {"summary": "Run summary (public, no secrets)", "responses": {"200": {"description": "status"}}}},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            PATH_CLIENTS: {"get": {"summary": "Registered clients (admin)", "security": [{"admin": []}],
                                   "responses": {"200": {"description": "clients"}, **_errors(401)}}},
            "/api/v1/audit": {"get": {"summary": "Security audit log (admin)", "security": [{"admin": []}],
                                      "responses": {"200": {"description": "events"}, **_errors(401)}}},
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
                          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
                "RegisterRequest": {"type": "object", "required": ["enrollment_token", "public_key"], "properties": {
                    "enrollment_token": {"type": "string"}, "public_key": {"type": "string"},
                    "client_name": {"type": "string", "maxLength": 64}, "partition": {"type": "integer", "minimum": 0},
                    "num_samples": {"type": "integer", "minimum": 1},
                    "capability": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}}},
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
                                                              "version to train on"}}},
                "ProfileSpec": {"type": "object", "properties": {
                    "policy": {"type": "string"}, "required": {"type": "array", "items": {"type": "string"}},
                    "optional": {"type": "array", "items": {"type": "string"}}, "num_classes": {"type": "integer"},
                    "label_histogram_epsilon": {"type": "number", "nullable": True},
                    "needed_for_selection": {"type": "boolean"}, "profile": {"type": "object", "nullable": True}}},
                "ProfileReport": {"type": "object", "required": ["num_samples"], "additionalProperties": False, "properties": {
                    "num_samples": {"type": "integer", "minimum": 1, "maximum": MAX_PROFILE_SAMPLES},
                    "capability": {"type": "object", "additionalProperties": False, "properties": {
                        name: {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_CAPABILITY_VALUE,
                               "description": "samples per second of local training" if name == "compute_speed"
                               else "bytes per second of the client's link"} for name in CAPABILITY_NAMES}},
                    "label_histogram": {"type": "array", "items": {"type": "number", "minimum": 0},
                                        "description": "num_classes counts; only when ProfileSpec asks for it"}}},
            },
        },
    }
