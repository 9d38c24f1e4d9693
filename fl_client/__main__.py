"""``python -m fl_client --server-url URL [--client-id NAME] [--data-dir DIR | --partition auto|K] [--state-dir DIR]``
``[--ca-file CA.pem]``: an https server is verified against this CA (or ``$FL_CA_FILE``, or the system's
trust store); plain http is for a loopback server only, unless ``--insecure-http`` (fl_client/tls.py).

``python -m fl_client --print-verify-key [--client-id NAME | --state-dir DIR]`` prints this client's
secure-aggregation verifying key (made in the state dir if there is none yet) and exits, without a
server: collect the lines of every client into one file and give it to each daemon with
``--secagg-trusted-keys FILE`` (fl_client/trusted_keys.py).

Exit status: 0 when the federation finished, the round limit was reached or a signal stopped
the daemon (or the key was printed); 1 when the server refused this client; 2 for bad
command-line input, a bad pinned-keys file included.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _partition(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a partition index, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a partition index is 0 or more")
    return value


def _url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, not {text!r}")
    return text


def _capability(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None
    if not name or number < 0:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER (>= 0), got {text!r}")
    return name, number


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fl_client", description="Federated Learning Hub client daemon")
    p.add_argument("--server-url", type=_url, help="e.g. http://127.0.0.1:8080 (required unless --print-verify-key)")
    p.add_argument("--client-id", dest="client_name", help="a stable name; re-registering with it keeps the partition")
    p.add_argument("--partition", type=_partition, default=None, metavar="auto|K",
                   help="which shard of the configured dataset to train on (default auto: the server assigns one)")
    p.add_argument("--data-dir", help="folder holding the dataset files (default: Debian's /usr/share/datasets/...)")
    p.add_argument("--state-dir", type=Path, help="credentials, the secure-aggregation signing key and client state (default: "
                        "./fl-client-state/<client-id or 'default'>)")
    p.add_argument("--enrollment-token", help=f"enrollment token (default: ${ENV_ENROLLMENT_TOKEN}); prefer the environment")
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds (10-300)")
    p.add_argument("--max-retries", type=int, default=3, help="retries per request on transport errors and 5xx (1-10)")
    p.add_argument("--max-rounds", type=int, help="exit after taking part in this many rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N|auto",
                   help="torch device for local training and DP-SGD (auto: the GPU when there is one)")
    p.add_argument("--capability", type=_capability, action="append", default=[], metavar="NAME=NUMBER",
                   help="capability sent at registration, e.g. --capability gpu=1 (repeatable; shown in the client table)")
    p.add_argument("--compute-speed", type=float, metavar="SAMPLES_PER_S",
                   help="training speed reported for client selection (capability, adaptive); default: measured on a few "
                        "batches of this client's data")
    p.add_argument("--bandwidth", type=float, metavar="BYTES_PER_S",
                   help="link speed reported for client selection (capability, adaptive); "
                        "default: not reported (no transfer time)")
    p.add_argument("--train-delay", type=float, default=0.0, metavar="SECONDS",
                   help="sleep this long after each local training: makes a slow device on a fast machine (tests, demos)")
    p.add_argument("--secagg-unmask-delay", type=float, default=0.0, metavar="SECONDS",
                   help="in a secure round, wait this long between the masked input and unmasking: makes a client that "
                        "goes away mid-protocol (tests, demos)")
    p.add_argument("--secagg-trusted-keys", metavar="FILE",
                   help="pinned Ed25519 verifying keys of the clients to run secure aggregation with (64 hex characters and "
                        "an optional label per line): a round whose roster carries any other key is refused")
    p.add_argument("--print-verify-key", action="store_true",
                   help="print this client's secure-aggregation verifying key (made in the state dir if there is none) "
                        "with the state dir as its label, and exit without contacting a server")
    p.add_argument("--ca-file", "--ca-cert", dest="ca_file", metavar="FILE",
                   help="CA certificate(s) to verify an https server with, e.g. the ca.pem of python -m fl_server tls-init "
                        "(default: $FL_CA_FILE, else the system's trust store)")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow a plain http:// server URL that is not loopback (tokens and metadata travel unencrypted)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="text, or json: one JSON object per line")
    p.add_argument("--no-long-poll", action="store_true",
                   help="poll the server at its suggested interval instead of waiting for it to push round changes "
                        "(long-polling; the daemon falls back to polling by itself where the server does not offer it)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar for local training (it is also off when stderr is not a terminal)")
    return p


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir or Path("fl-client-state") / (args.client_name or "default")


def _print_verify_key(state_dir: Path) -> int:
    """One line of a pinned-keys file: the key the daemon in ``state_dir`` signs with, labelled with the dir."""
    from fl_client.trusted_keys import format_verify_key, load_or_create_identity

    try:
        identity, _ = load_or_create_identity(state_dir)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load or create the signing key in {state_dir}: {exc}", file=sys.stderr)
        return 2
    print(f"{format_verify_key(identity.verify_key)}  {state_dir}")
    return 0


def _trusted_keys(path: str | None) -> frozenset[bytes] | None:
    """The pinned keys, read before anything starts: a bad file is an input error (SystemExit 2), not a round refused later."""
    if path is None:
        return None
    from fl_client.trusted_keys import load_trusted_keys

    try:
        return load_trusted_keys(path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_verify_key:
        return _print_verify_key(_state_dir(args))
    if args.server_url is None:
        parser.error("the following arguments are required: --server-url")
    trusted = _trusted_keys(args.secagg_trusted_keys)
    if not 10 <= args.timeout <= 300:
        print("error: --timeout must be between 10 and 300 seconds", file=sys.stderr)
        return 2
    if not 1 <= args.max_retries <= 10:
        print("error: --max-retries must be between 1 and 10", file=sys.stderr)
        return 2
    if args.threads < 1 or (args.max_rounds is not None and args.max_rounds < 1):
        print("error: --threads and --max-rounds must be at least 1", file=sys.stderr)
        return 2
    from fl_common.config import ConfigError
    from fl_common.training import resolve_device

    try:
        resolve_device(args.device)  # refused now, not after registering: a GPU that is not there, a misspelling
    except ConfigError as exc:
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    for flag, value, top in (("--compute-speed", args.compute_speed, 1e15), ("--bandwidth", args.bandwidth, 1e15)):
        if value is not None and not (0 < value <= top):
            print(f"error: {flag} must be a number in (0, {top:g}]", file=sys.stderr)
            return 2
    for flag, value in (("--train-delay", args.train_delay), ("--secagg-unmask-delay", args.secagg_unmask_delay)):
        if not 0 <= value <= 3600:
            print(f"error: {flag} must be between 0 and 3600 seconds", file=sys.stderr)
            return 2
    from fl_client.tls import TransportRefused, transport_security

    try:
        transport = transport_security(args.server_url, args.ca_file, insecure_http=args.insecure_http)
    except TransportRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from fl_common.logs import configure_logging

    configure_logging(args.log_level, args.log_format,
                      text_format=f"%(asctime)s %(levelname)s fl_client[{args.client_name or os.getpid()}]: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("fl_client").info("transport: %s", transport.description)
    if trusted is not None:
        logging.getLogger("fl_client").info("secure aggregation: %d pinned verifying keys from %s", len(trusted),
                                            args.secagg_trusted_keys)
    from fl_client.daemon import ClientDaemon, DaemonOptions
    from fl_common.data import DatasetUnavailable

    state_dir = _state_dir(args)
    daemon = ClientDaemon(DaemonOptions(
        server_url=args.server_url, state_dir=state_dir,
        enrollment_token=args.enrollment_token or os.environ.get(ENV_ENROLLMENT_TOKEN), client_name=args.client_name,
        partition=args.partition, data_dir=args.data_dir, timeout=args.timeout, max_retries=args.max_retries,
        max_rounds=args.max_rounds, threads=args.threads, device=args.device, capability=dict(args.capability),
        verify_tls=transport.verify, progress=False if args.no_progress else None,
        compute_speed=args.compute_speed, bandwidth=args.bandwidth, train_delay=args.train_delay,
        secagg_unmask_delay=args.secagg_unmask_delay, secagg_trusted_keys=trusted,
        long_poll=not args.no_long_poll))
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
