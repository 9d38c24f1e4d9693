"""How the client daemon secures its connection to the server, decided once, before anything is sent.

* ``https://`` URLs are verified: against ``--ca-file`` (or ``$FL_CA_FILE``), the server's private CA
  from ``python -m fl_server tls-init``, or else the system's trust store. Verification is never
  switched off.
* ``http://`` is accepted only for a loopback host (the traffic never leaves the machine), or with
  ``--insecure-http``: the session token, the signed headers and the payload metadata would otherwise
  cross the network in the clear. Fernet and HMAC still protect updates and models on top of TLS
  (defence in depth), not instead of it.

The result is the ``verify`` value of the ``requests`` session that :class:`fl_client.api.ServerApi` opens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from fl_common.crypto.tls import ENV_CA_FILE, TlsError, check_ca_file, is_loopback_host


class TransportRefused(ValueError):
    """The URL / CA combination is unsafe or unusable; the message is one line for the user."""


@dataclass(frozen=True)
class TransportSecurity:
    """What the daemon's HTTP session does: ``verify`` for requests, and a one-line description for the log."""

    verify: bool | str
    description: str


def transport_security(server_url: str, ca_file: str | None = None, *, insecure_http: bool = False,
                       environ: Mapping[str, str] = os.environ) -> TransportSecurity:
    """Check ``server_url`` against the rules of the module docstring and return the session's ``verify`` value."""
    parsed = urlparse(server_url)
    host = parsed.hostname or ""
    ca = ca_file or environ.get(ENV_CA_FILE) or None
    if parsed.scheme == "http":
        if not is_loopback_host(host) and not insecure_http:
            raise TransportRefused(f"refusing plain http to {host}, which is not loopback: use an https:// URL "
                                   f"(with --ca-file for a private CA) or pass --insecure-http")
        where = "loopback" if is_loopback_host(host) else "NOT ENCRYPTED in transit (--insecure-http)"
        return TransportSecurity(True, f"plain http to {host} ({where}); updates still Fernet-encrypted and signed")
    if parsed.scheme != "https":
        raise TransportRefused(f"the server URL must start with http:// or https://, not {server_url!r}")
    if ca is None:
        return TransportSecurity(True, f"https to {host}, verified against the system's trust store")
    try:
        count = check_ca_file(ca)
    except TlsError as exc:
        raise TransportRefused(str(exc)) from None
    return TransportSecurity(str(ca), f"https to {host}, verified against {ca} ({count} certificate(s))")


__all__ = ["ENV_CA_FILE", "TransportRefused", "TransportSecurity", "transport_security"]
