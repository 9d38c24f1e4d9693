"""Command line: ``python -m fl_server simulate --config FILE [--output DIR] [--set k=v ...]``.

Every user error (bad config key or value, missing dataset, occupied output folder) ends with
one line on stderr and exit status 2, before any training starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fl_common.config import ConfigError, load_config
from fl_common.data import DatasetUnavailable

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other user error
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fl_server", description="Federated Learning Hub server and simulator")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text, or json: one JSON object per line (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="run a whole federation in this process (workers for parallel clients)")
    sim.add_argument("--config", type=Path, help="YAML config file (defaults are the seed's)")
    sim.add_argument("--output", type=Path, help="run folder for history.csv, summary.json, checkpoints (default: runs/<time>)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key (repeatable), e.g. --set num_rounds=5")
    sim.add_argument("--data-dir", type=Path, help="folder with the dataset files (same as --set data_dir=DIR)")
    sim.add_argument("--backend", choices=("process", "ray"), help="where clients train (same as --set backend=...): "
                     "a process pool here, or Ray tasks on a Ray cluster (pip install '.[ray]')")
    sim.add_argument("--ray-address", metavar="ADDR", help="with --backend ray: the Ray cluster to join, e.g. 10.0.0.1:6379 "
                     "or auto (same as --set ray_address=ADDR; default: a private one-node Ray)")
    sim.add_argument("--centralized", action="store_true", help="train the same model on the pooled data instead (baseline)")
    sim.add_argument("--local-only", action="store_true",
                     help="train every client alone for local_only_epochs epochs, no communication (baseline)")
    sim.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")

    srv = sub.add_parser("serve", help="serve the REST API with gunicorn (one coordinator process, gthread workers)")
    srv.add_argument("--config", type=Path, help="YAML config file")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    srv.add_argument("--state-dir", type=Path, default=Path("fl-server-state"), help="SQLite store, updates, checkpoints")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to listen on all interfaces: needs "
                     "--certfile/--keyfile, see tls-init, or --insecure-http)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--threads", type=int, default=8, help="request threads in the gthread worker")
    srv.add_argument("--certfile", help="TLS certificate (PEM); with --keyfile the server speaks https")
    srv.add_argument("--keyfile", help="TLS private key (PEM)")
    srv.add_argument("--insecure-http", action="store_true",
                     help="serve plain http on a non-loopback --host (only behind a TLS-terminating proxy on a trusted network)")

    tls = sub.add_parser("tls-init", help="make a private CA and a server certificate for serve --certfile/--keyfile")
    tls.add_argument("--out", type=Path, required=True, help="folder for ca.pem, ca-key.pem, server.pem, server-key.pem")
    tls.add_argument("--hosts", required=True, metavar="HOST[,HOST...]",
                     help="DNS names and IP addresses clients reach the server by (the certificate's subjectAltName)")

    demo = sub.add_parser("demo", help="server + N client processes on loopback, trained end to end")
    demo.add_argument("--clients", type=int, default=10)
    demo.add_argument("--rounds", type=int, help="rounds to train (default 5)")
    demo.add_argument("--config", type=Path, help="YAML config file over the demo's embedded defaults")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--output", type=Path, help="demo folder (default: runs/demo-<time>)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--no-privacy", action="store_true",
                      help="turn differential privacy and secure aggregation off (for comparison; Fernet + HMAC stay)")

    audit = sub.add_parser("audit", help="print the security audit log of a server's state directory")
    audit.add_argument("--state-dir", type=Path, default=Path("fl-server-state"), help="the server's --state-dir")
    audit.add_argument("--limit", type=int, default=200, help="newest events to print (1-100000, default 200)")
    audit.add_argument("--kind", help="only events of this kind, e.g. registered, bad_token, update_bad_payload")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    from fl_server.rest.admin_cli import add_admin_parser

    admin = add_admin_parser(sub)
    for p in (sim, srv, tls, demo, audit, admin):  # `serve --log-format json` as well as `--log-format json serve`
        p.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _audit(args: argparse.Namespace) -> int:
    from fl_server.rest.audit import AuditError, format_event, read_events

    if not 1 <= args.limit <= 100_000:
        raise ConfigError(f"--limit must be in 1..100000, got {args.limit}")
    try:
        events = read_events(args.state_dir, limit=args.limit, kind=args.kind)
    except AuditError as exc:
        raise ConfigError(str(exc)) from None
    for event in events:
        print(format_event(event, as_json=args.json))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fl_server.rest.serve import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    from fl_common.crypto.tls import TlsError, check_server_pair, is_loopback_host

    if bool(args.certfile) != bool(args.keyfile):
        raise ConfigError("--certfile and --keyfile go together")
    for f in (args.certfile, args.keyfile):
        if f and not Path(f).is_file():
            raise ConfigError(f"TLS file '{f}' does not exist")
    if args.certfile:
        try:
            check_server_pair(args.certfile, args.keyfile)
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
    elif not is_loopback_host(args.host) and not args.insecure_http:
        raise ConfigError(f"--host {args.host} is reachable from other machines: serve https with --certfile/--keyfile "
                          f"(python -m fl_server tls-init makes them) or pass --insecure-http")
    cfg = load_config(args.config, args.overrides)
    from fl_server.rest.gateway import check_rest_config

    check_rest_config(cfg)
    from fl_server.compliance import write_transport_record

    try:  # what the run's compliance record says about TLS
        write_transport_record(args.state_dir, host=args.host, port=args.port, certfile=args.certfile)
    except OSError as exc:
        raise ConfigError(f"cannot write to --state-dir {args.state_dir}: {exc.strerror or exc}") from None
    if not args.certfile and not is_loopback_host(args.host):
        logging.getLogger("fl_server").warning("serving plain http on %s (--insecure-http): session tokens and request "
                                               "metadata cross the network unencrypted unless a TLS proxy is in front",
                                               args.host)
    serve(cfg, args.state_dir, host=args.host, port=args.port, threads=args.threads, log_format=args.log_format,
          log_level=args.log_level, certfile=args.certfile,
          keyfile=args.keyfile)
    return 0


def _tls_init(args: argparse.Namespace) -> int:
    from fl_common.crypto.tls import TlsError, ensure_tls

    try:
        result = ensure_tls(args.out, args.hosts)
    except TlsError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot write the TLS files in {args.out}: {exc.strerror or exc}") from None
    files = result.files
    print(json.dumps({"ca_cert": str(files.ca_cert), "ca_key": str(files.ca_key), "server_cert": str(files.server_cert),
                      "server_key": str(files.server_key), "hosts": list(result.hosts), "ca_created": result.ca_created,
                      "server_created": result.server_created, "server_not_after": result.server_not_after.isoformat(),
                      "ca_sha256": result.ca_fingerprint_sha256}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fl_server.rest.demo import demo_config, demo_summary, run_demo

    if not 1 <= args.clients <= 200:
        raise ConfigError(f"--clients must be in 1..200, got {args.clients}")
    cfg = demo_config(args.clients, config=args.config, rounds=args.rounds, overrides=args.overrides,
                      private=not args.no_privacy)
    from fl_server.rest.gateway import check_rest_config

    check_rest_config(cfg)
    output = args.output or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    status = run_demo(cfg, output, args.clients, progress=False if args.no_progress else None)
    print(demo_summary(output, status, cfg.label_histogram_epsilon))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fl_server.simulation import CentralizedBaseline, Simulation

    log = logging.getLogger("fl_server")
    if args.resume and args.output is None:
        raise ConfigError("--resume needs --output DIR, the run folder to continue")
    if args.local_only and (args.centralized or args.resume):
        raise ConfigError(f"--local-only cannot be combined with {'--centralized' if args.centralized else '--resume'} "
                          f"(it is a baseline of its own, and runs in one go)")
    if args.resume and args.config is None and (args.output / "config.yaml").is_file():
        args.config = args.output / "config.yaml"
    overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    overrides += ([f"backend={args.backend}"] if args.backend else []) + ([f"ray_address={args.ray_address}"] if args.ray_address else [])
    cfg = load_config(args.config, overrides)
    kind = "centralized" if args.centralized else "local-only" if args.local_only else "sim"
    output = args.output or Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S")
    progress = False if args.no_progress else None
    log.info("config: %s clients, %s rounds, %s per round, %s, %s on %s (%s)", cfg.num_clients, cfg.num_rounds,
             cfg.clients_per_round, cfg.aggregation_method, cfg.model_type, cfg.dataset, cfg.data_distribution)
    if args.centralized:
        base = CentralizedBaseline(cfg, output, progress=progress)
        base.train()
        summary = base.save_results()
    elif args.local_only:
        from fl_server.simulation.local_only import LocalOnlyBaseline

        local = LocalOnlyBaseline(cfg, output, progress=progress)
        local.train()
        summary = local.save_results()
    else:
        from fl_server.simulation import AsyncSimulation, SimulationBase

        driver: type[SimulationBase[Any]] = AsyncSimulation if cfg.training_mode == "async" else Simulation
        with driver(cfg, output, resume=args.resume, progress=progress) as sim:
            log.info("start-up %.1f s; %d clients hold %s-%s samples; results in %s", sim.startup_seconds, cfg.num_clients,
                     min(map(len, sim.partitions)), max(map(len, sim.partitions)), output)
            sim.train()
            summary = sim.save_results()
    final = summary["final_accuracy"]
    privacy = summary.get("privacy") or {}
    extra = ({"epsilon": privacy["epsilon_spent"], "delta": privacy["delta"]} if privacy.get("differential_privacy") else {})
    if summary.get("stop_reason"):
        extra["stopped"] = summary["stop_reason"]
    if summary.get("mode") == "local_only":  # final_accuracy is the clients' models' mean on the global test set
        extra["client_mean"] = summary["client_accuracy"]["mean"]
        extra["client_worst_10pct"] = summary["client_accuracy"]["worst_10pct"]
        extra["client_measure"] = summary["client_accuracy"]["measure"]
    elif "personalization" in summary:
        extra["personalization"] = {k: summary["personalization"][k]["mean"] for k in ("federated", "finetuned", "local_only")
                                    if k in summary["personalization"]}
    print(json.dumps({"output": str(output), "final_accuracy": final, "best_accuracy": summary["best_accuracy"],
                      "wall_seconds": round(summary["wall_seconds"], 2), **extra}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fl_common.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "tls-init":
            return _tls_init(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "admin":
            from fl_server.rest.admin_cli import AdminError, run_admin

            try:
                return run_admin(args)
            except AdminError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    except (ConfigError, DatasetUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the last completed round is checkpointed; continue with --resume", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
