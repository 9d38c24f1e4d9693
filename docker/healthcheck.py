"""Container health check for the Federated Learning Hub image (used by HEALTHCHECK).

The image runs either the server or a client, so the check first looks for a
``fl_server serve`` process in the container. Found: GET /health on its port (https when it
was started with --certfile; the certificate is not verified, this is a loopback liveness
probe) and exit 0 only on 200 {"status": "ok"}. Not found (a client container): exit 0, there
is nothing to probe. Standard library only; at most one request with a short timeout.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request


def _server_args() -> list[str] | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        joined = " ".join(args)
        if ("fl_server" in joined or "fl-server" in joined) and "serve" in args:
            return args
    return None


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main() -> int:
    args = _server_args()
    if args is None:
        return 0  # a client (or a one-off command): no HTTP endpoint to probe
    port = _option(args, "--port") or "8080"
    tls = _option(args, "--certfile") is not None
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    context = ssl._create_unverified_context() if tls else None
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as resp:
            body = json.loads(resp.read() or b"{}")
            ok = resp.status == 200 and body.get("status") == "ok"
    except Exception as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url} answered {body!r}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
