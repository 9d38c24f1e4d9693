"""``python -m fl_server admin ...``: manage a running server's clients and enrollment tokens over HTTP.

The admin endpoints need the admin token: ``--admin-token-file`` (the server's
``STATE_DIR/admin_token``), or ``FL_ADMIN_TOKEN`` in the environment. Never a command-line
argument: it would be visible to every user of the machine in the process list.

    python -m fl_server admin --server-url http://127.0.0.1:8080 --admin-token-file STATE/admin_token clients list
    python -m fl_server admin ... clients revoke c-0123456789abcdef
    python -m fl_server admin ... clients remove c-0123456789abcdef   # erase its stored data
    python -m fl_server admin ... enrollments create --name hospital-7 --expires-in 86400
    python -m fl_server admin ... enrollments list
    python -m fl_server admin ... enrollments revoke e-0123456789ab

Every failure (server unreachable, wrong token, unknown client) is one line on stderr and a
non-zero exit (the caller raises :class:`AdminError`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from fl_common.crypto.tls import ENV_CA_FILE, is_loopback_host
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, PATH_CLIENTS, PATH_ENROLLMENTS


class AdminError(Exception):
    """A one-line reason the admin command failed."""


def add_admin_parser(sub: Any) -> argparse.ArgumentParser:
    admin = sub.add_parser("admin", help="manage a running server's clients and enrollment tokens (admin token)")
    admin.add_argument("--server-url", required=True, help="e.g. http://127.0.0.1:8080")
    admin.add_argument("--admin-token-file", type=Path, help="file holding the admin token (the server's STATE_DIR/admin_token); "
                       f"default: ${ENV_ADMIN_TOKEN}")
    admin.add_argument("--ca-file", type=Path, help="CA certificate to verify an https server with (the ca.pem of tls-init; "
                       f"default: ${ENV_CA_FILE}, else the system's trust store)")
    admin.add_argument("--insecure-http", action="store_true",
                       help="allow a plain http:// server URL that is not loopback (the admin token would travel unencrypted)")
    admin.add_argument("--json", action="store_true", help="print the server's JSON answer")
    what = admin.add_subparsers(dest="admin_target", required=True)
    clients = what.add_parser("clients", help="list, revoke or remove (erase) clients")
    clients.add_argument("action", choices=["list", "revoke", "remove"])
    clients.add_argument("client_id", nargs="?", help="for revoke / remove")
    enroll = what.add_parser("enrollments", help="create, list or revoke per-client enrollment tokens")
    enroll.add_argument("action", choices=["create", "list", "revoke"])
    enroll.add_argument("enrollment_id", nargs="?", help="for revoke")
    enroll.add_argument("--name", help="create: bind the token to this client_name")
    enroll.add_argument("--uses", type=int, default=1, help="create: registrations the token allows (default 1)")
    enroll.add_argument("--expires-in", type=float, help="create: seconds until the token expires (60 .. 31536000)")
    return admin


def _token(args: argparse.Namespace) -> str:
    if args.admin_token_file is not None:
        try:
            token = args.admin_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AdminError(f"cannot read --admin-token-file {args.admin_token_file}: {exc.strerror}") from None
    else:
        token = os.environ.get(ENV_ADMIN_TOKEN, "")
    if not token:
        raise AdminError(f"no admin token: pass --admin-token-file STATE_DIR/admin_token or set {ENV_ADMIN_TOKEN}")
    return token


def _verify(args: argparse.Namespace) -> bool | str:
    """requests' ``verify`` for the server URL; plain http only to loopback unless --insecure-http (the admin
    token must not cross a network in the clear)."""
    parsed = urlparse(args.server_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise AdminError(f"--server-url must be an http:// or https:// URL, not {args.server_url!r}")
    if parsed.scheme == "http" and not is_loopback_host(parsed.hostname) and not args.insecure_http:
        raise AdminError(f"refusing plain http to {parsed.hostname}, which is not loopback: the admin token would travel "
                         f"unencrypted; use https (with --ca-file) or pass --insecure-http")
    ca = str(args.ca_file) if args.ca_file is not None else os.environ.get(ENV_CA_FILE) or None
    return ca if ca is not None else True


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import requests  # here, not at the top: every fl_server command builds this parser; only `admin` sends (~70 ms)

    url = args.server_url.rstrip("/") + path
    verify = _verify(args)
    try:
        resp = requests.request(method, url, json=body, headers={"Authorization": f"Bearer {_token(args)}"}, timeout=30,
                                verify=verify)
    except requests.RequestException as exc:
        raise AdminError(f"cannot reach {args.server_url}: {type(exc).__name__}") from None
    try:
        data = resp.json()
    except ValueError:
        raise AdminError(f"{method} {path}: HTTP {resp.status_code}, not JSON") from None
    if resp.status_code >= 400:
        raise AdminError(f"{method} {path}: HTTP {resp.status_code} {data.get('error')}: {data.get('message')}")
    return data


def _need(value: str | None, what: str) -> str:
    if not value:
        raise AdminError(f"this action needs {what}")
    return value


def run_admin(args: argparse.Namespace) -> int:
    """Carry out one admin command and print its result (a table, or JSON with --json)."""
    if args.admin_target == "clients":
        if args.action == "list":
            data = _call(args, "GET", PATH_CLIENTS)
            rows = data["clients"]
            lines = [f"{c['client_id']}  {c.get('name') or '-':<20} partition {c.get('partition')}  "
                     f"{'online' if c.get('online') else 'offline'}  rounds {c.get('rounds_participated')}" for c in rows]
        else:
            cid = quote(_need(args.client_id, "a CLIENT_ID"), safe="")
            data = _call(args, "POST", f"{PATH_CLIENTS}/{cid}/revoke", {}) if args.action == "revoke" \
                else _call(args, "DELETE", f"{PATH_CLIENTS}/{cid}")
            lines = [json.dumps(data, sort_keys=True)]
    else:
        if args.action == "create":
            body: dict[str, Any] = {"uses": args.uses}
            if args.name:
                body["client_name"] = args.name
            if args.expires_in is not None:
                body["expires_in_s"] = args.expires_in
            data = _call(args, "POST", PATH_ENROLLMENTS, body)
            lines = [f"enrollment {data['enrollment_id']}: give this token to the client (shown once):",
                     data["enrollment_token"]]
        elif args.action == "list":
            data = _call(args, "GET", PATH_ENROLLMENTS)
            lines = [f"{e['enrollment_id']}  {e.get('client_name') or 'any name':<20} uses {e['uses']}/{e['max_uses']}"
                     f"  {'revoked' if e.get('revoked_at') else 'active'}" for e in data["enrollments"]]
        else:
            eid = quote(_need(args.enrollment_id, "an ENROLLMENT_ID"), safe="")
            data = _call(args, "DELETE", f"{PATH_ENROLLMENTS}/{eid}")
            lines = [json.dumps(data, sort_keys=True)]
    print(json.dumps(data, sort_keys=True) if args.json else "\n".join(lines))
    return 0


__all__ = ["AdminError", "add_admin_parser", "run_admin"]
