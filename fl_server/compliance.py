"""The compliance record of a run: ``compliance.json`` beside ``report.md`` / ``report.html``.

It answers, for whoever keeps records of processing, what this run did with people's data, and
only from what the run itself recorded:

* what left the clients (update bytes, the codec, encryption, whether the server could see any
  one client's update);
* the protections in force (differential privacy with the exact meaning of its (epsilon, delta),
  secure aggregation and its threshold, TLS);
* who took part (pseudonymous ids only, and counts per round);
* where state is kept and for how long (retention settings);
* the digest of the security audit log (REST server) and the data-subject requests handled
  (erasures through the admin interface).

Both drivers write it: the simulation from its run folder alone (``deployment`` is None: transport,
audit log and erasure do not apply, and the record says so), the REST server adding the
:class:`DeploymentFacts` that only its store knows (fl_server/rest/run_report.py). Every number
is copied from ``summary.json``, ``history.csv``, ``participation_rounds.csv`` or the audit log, so a
reader (and tests) can check it against those files. The record states facts of the software's
behaviour; it is not legal advice and does not say that any law is complied with
(docs/compliance.md says what remains the operator's duty).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_server.privacy.statement import GUARANTEES
from fl_server.store.run_dir import atomic_write_bytes

log = logging.getLogger("fl_server.compliance")

COMPLIANCE_JSON = "compliance.json"
SCHEMA = "fl-hub-compliance/1"
#: what a run's "transport" record is written to in the REST server's state folder (python -m fl_server serve)
TRANSPORT_JSON = "transport.json"
#: the audit event kind of an erasure (fl_server/rest/erasure.py)
ERASURE_EVENT = "client_erased"
#: the report lists this many pseudonymous ids; compliance.json lists them all
MAX_IDS_SHOWN = 50

#: the exact meaning of one (epsilon, delta) of each DP granularity (one text for the report, the demo and this record)
DP_MEANING = GUARANTEES
ERASURE_SCOPE = ("the client's registration (its pseudonymous id, name, partition, capability and profile), its session-token "
                 "hash and wrapped session keys, its stored update payloads, its participation and nonce rows, its audit events, "
                 "and every mention of its id or name in the run folder (tables, reports, checkpoint)")
ERASURE_LIMIT = ("its contribution to every global model aggregated before the erasure cannot be taken out of those models or "
                 "of the round totals (history.csv counts it); copies the operator made elsewhere (backups, exported models) "
                 "are outside the software's reach")


_RECEIPT = re.compile(r"erasure receipt (er-[0-9a-f]{12})")


def erasure_detail(receipt: str, rows: int, files: int, rewritten: int) -> str:
    """The audit-log text of an erasure: its receipt and counts, no id and no name."""
    return (f"erasure receipt {receipt}: a client was erased by an admin; {rows} row(s), {files} file(s) deleted, "
            f"{rewritten} run file(s) rewritten")


def receipt_of(detail: str) -> str | None:
    """The receipt in a ``client_erased`` event's detail, or None."""
    match = _RECEIPT.search(detail)
    return match.group(1) if match else None


@dataclass(frozen=True)
class AuditEvent:
    """One row of the security audit log, as the store keeps it."""

    id: int
    at: float
    kind: str
    client_id: str | None
    detail: str

    def canonical(self) -> str:
        return json.dumps([self.id, self.at, self.kind, self.client_id, self.detail], separators=(",", ":"),
                          ensure_ascii=False)


@dataclass(frozen=True)
class AuditDigest:
    """SHA-256 over the events' canonical lines (``[id, at, kind, client_id, detail]`` as compact JSON, joined by
    newlines, oldest first): recompute it from ``python -m fl_server audit --json`` to check the log was not altered."""

    events: int
    first_id: int | None
    last_id: int | None
    sha256: str

    @classmethod
    def of(cls, events: Sequence[AuditEvent]) -> AuditDigest:
        ordered = sorted(events, key=lambda e: e.id)
        text = "\n".join(e.canonical() for e in ordered)
        return cls(len(ordered), ordered[0].id if ordered else None, ordered[-1].id if ordered else None,
                   hashlib.sha256(text.encode("utf-8")).hexdigest())


@dataclass(frozen=True)
class TransportRecord:
    """How ``python -m fl_server serve`` listened (``STATE_DIR/transport.json``)."""

    scheme: str
    bind: str
    certificate_hosts: tuple[str, ...] = ()
    certificate_not_after: str | None = None
    certificate_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "bind": self.bind, "certificate_hosts": list(self.certificate_hosts),
                "certificate_not_after": self.certificate_not_after, "certificate_sha256": self.certificate_sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TransportRecord:
        return cls(str(data["scheme"]), str(data["bind"]), tuple(str(h) for h in data.get("certificate_hosts") or ()),
                   data.get("certificate_not_after"), data.get("certificate_sha256"))


def write_transport_record(state_dir: Path, *, host: str, port: int, certfile: str | None) -> TransportRecord:
    """Record, in the server's state folder, whether it serves https and with which certificate (the REST
    run's compliance record reads it; the server process itself never learns how gunicorn listens)."""
    from fl_common.crypto.tls import certificate_hosts

    if certfile:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
        record = TransportRecord("https", f"{host}:{port}", certificate_hosts(cert), cert.not_valid_after_utc.isoformat(),
                                 cert.fingerprint(hashes.SHA256()).hex())
    else:
        record = TransportRecord("http", f"{host}:{port}")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(state_dir / TRANSPORT_JSON, json.dumps(record.to_json(), indent=2).encode("utf-8"))
    return record


def read_transport_record(state_dir: Path) -> TransportRecord | None:
    try:
        return TransportRecord.from_json(json.loads((state_dir / TRANSPORT_JSON).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class DeploymentFacts:
    """What only a REST server knows about its run: given by fl_server/rest/run_report.py."""

    state_dir: Path
    transport: TransportRecord | None
    #: pseudonymous ids of the clients registered when the record was written (random "c-" + 16 hex digits)
    client_ids: tuple[str, ...]
    #: bytes of the accepted updates per round number (all attempts), as the clients uploaded them
    update_bytes_per_round: dict[int, int]
    audit: AuditDigest
    #: receipts of the erasures in the audit log (fl_server/rest/erasure.py), oldest first
    erasure_receipts: tuple[str, ...]
    audit_retention_days: float
    audit_max_events: int
    session_ttl_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def _na(why: str) -> dict[str, Any]:
    return {"applies": False, "why": why}


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _int(text: str | None) -> int:
    try:
        return int(float(text or 0))
    except ValueError:
        return 0


def _participation(run_dir: Path, history: list[dict[str, str]], deployment: DeploymentFacts | None) -> dict[str, Any]:
    rows = _read_csv(run_dir / "participation_rounds.csv")
    per_round: dict[int, dict[str, int]] = {}
    ids: list[str] = []
    for r in rows:
        n = _int(r.get("round"))
        slot = per_round.setdefault(n, {"selected": 0, "arrived": 0})
        slot["selected"] += _int(r.get("selected"))
        slot["arrived"] += _int(r.get("arrived"))
        cid = r.get("client_id") or ""
        if cid and cid not in ids:
            ids.append(cid)
    aggregated = {_int(h.get("round")): _int(h.get("clients")) for h in history}
    rounds = [{"round": n, "selected": per_round.get(n, {}).get("selected"), "arrived": per_round.get(n, {}).get("arrived"),
               "aggregated": aggregated.get(n)} for n in sorted(set(per_round) | set(aggregated))]
    if deployment is not None:
        kind = ("random server-assigned ids ('c-' + 16 hex digits), not derived from the client's name or data; client "
                "names chosen at registration are not part of this record")
        known = list(deployment.client_ids)
    else:
        kind = "simulated clients, numbered by their data partition"
        known = ids
    return {"pseudonymous_ids": known, "id_kind": kind, "clients": len(known),
            "took_part": sorted(ids, key=str) if deployment is not None else ids,
            "per_round": rounds, "source": "participation_rounds.csv (selected, arrived) and history.csv (aggregated)"}


def _dp(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    raw = summary.get("privacy")
    privacy: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if not privacy.get("differential_privacy"):
        if config.get("differential_privacy") is True:
            return {"on": None, "statement": "configured on, but summary.json records no accounting: no guarantee is claimed"}
        return {"on": False, "statement": "off: no (epsilon, delta) guarantee is claimed"}
    mode = str(privacy.get("mode"))
    out: dict[str, Any] = {"on": True, "granularity": mode, "epsilon_spent": privacy.get("epsilon_spent"),
                           "delta": privacy.get("delta"), "epsilon_budget": privacy.get("epsilon_budget"),
                           "accountant": privacy.get("accountant"), "noise": privacy.get("noise"),
                           "clip_norm": privacy.get("clip_norm"),
                           "meaning": DP_MEANING.get(mode, f"granularity {mode!r}: see summary.json's privacy block")}
    if "noise_randomness" in privacy:
        out["noise_randomness"] = privacy["noise_randomness"]
    return {k: v for k, v in out.items() if v is not None}


def _secagg(summary: dict[str, Any], config: dict[str, Any], mode: str | None) -> dict[str, Any]:
    if mode in ("centralized", "local_only"):
        return _na(f"{mode} baseline: there is no aggregation")
    block = summary.get("secure_aggregation")
    if not config.get("secure_aggregation") and not (isinstance(block, dict) and block.get("enabled")):
        return {"on": False, "statement": "off: the server received each selected client's update on its own"}
    out: dict[str, Any] = {"on": True, "threshold_setting": config.get("secagg_threshold"),
                           "threshold_meaning": ("Shamir threshold: the fraction of each client's share holders needed to "
                                                 "unmask; null means derived from the SecAgg+ failure bound (always a strict "
                                                 "majority)")}
    if isinstance(block, dict):
        out["protocol"] = block.get("protocol")
        last = block.get("last_round_parameters")
        if isinstance(last, dict):
            out["last_round"] = {k: last[k] for k in ("clients", "threshold", "degree", "complete_graph", "modulus_bits")
                                 if k in last}
    return out


def _left_clients(summary: dict[str, Any], history: list[dict[str, str]], config: dict[str, Any], mode: str | None,
                  deployment: DeploymentFacts | None, secagg_on: bool) -> dict[str, Any]:
    traffic = [_int(h.get("bytes")) for h in history]
    if mode == "centralized":
        return {"raw_training_data": "pooled in one process (centralized baseline): no client boundary exists",
                "traffic_bytes_per_round": traffic}
    if mode == "local_only":
        return {"raw_training_data": "stayed with each client", "model_updates": "none (local-only baseline)",
                "traffic_bytes_per_round": traffic}
    if mode is None:
        return {"raw_training_data": "not stated: summary.json does not record the run's mode",
                "traffic_bytes_per_round": traffic}
    out: dict[str, Any] = {
        "raw_training_data": ("never left the clients: only model updates (with a sample count and per-update metrics) did"
                              if deployment is not None else "the aggregation received only model updates; in a "
                              "simulation every client's data is read by this one process"),
        "codec": summary.get("codec", config.get("codec")),
        "traffic_bytes_total": summary.get("total_bytes"),
        "traffic_bytes_per_round": traffic,
        "traffic_meaning": "history.csv 'bytes': model downloads plus update uploads of each round",
        "individual_updates_visible_to_server": not secagg_on,
        "visibility_meaning": ("secure aggregation: the server only ever adds masked vectors and learns the sum of each "
                               "round's surviving clients, never one client's update" if secagg_on else
                               "the server decrypts and reads each client's update on its own"),
    }
    if deployment is not None:
        out["update_bytes_uploaded_per_round"] = {str(k): v for k, v in sorted(deployment.update_bytes_per_round.items())}
        out["update_bytes_uploaded_total"] = sum(deployment.update_bytes_per_round.values())
        out["client_metrics_sent"] = summary.get("client_metrics_sent")
        out["encryption"] = ("Fernet (AES-128-CBC + HMAC-SHA256) for messages under 64 KiB, AES-256-GCM for larger "
                             "bodies (models, updates), under keys agreed per client (X25519 + HKDF), on top of the transport"
                             if summary.get("encryption") is True else "off (payloads not encrypted by the "
                             "application)")
        out["request_signing"] = "HMAC-SHA256 over method, path, body, timestamp and nonce; replays refused"
    else:
        out["encryption"] = _na("in-process simulation: nothing travelled over a network")
    return out


def _storage(run_dir: Path, deployment: DeploymentFacts | None) -> dict[str, Any]:
    if deployment is None:
        return {"run_folder": str(run_dir.resolve()),
                "contents": "results (history.csv, summary.json, participation and accuracy tables, plots, reports), the "
                            "final model and a checkpoint; no client data",
                "retention": "kept until the operator deletes the folder; the software deletes nothing by itself"}
    state = deployment.state_dir.resolve()
    return {"state_dir": str(state), "run_folder": str(run_dir.resolve()),
            "contents": {"server.db": "registered clients (pseudonymous id, optional name, partition, capability, profile), "
                                      "session-token hashes, wrapped session keys, rounds, accepted-update metadata, "
                                      "replay nonces, the security audit log",
                         "updates/": "accepted update payloads of plain rounds (secure rounds store no masked input)",
                         "run/": "results, reports, the global model and checkpoints",
                         "secrets": "server secret, admin and enrollment tokens (0600)"},
            "retention": {"audit_log_days": deployment.audit_retention_days,
                          "audit_log_max_events": deployment.audit_max_events,
                          "session_token_ttl_s": deployment.session_ttl_s,
                          "update_payloads": "kept until the operator deletes the state folder or erases the client",
                          "clients": "kept until erased through the admin interface (admin clients remove ID)"},
            "file_modes": "state folder 0700, secrets and keys 0600"}


def _transport(deployment: DeploymentFacts | None) -> dict[str, Any]:
    if deployment is None:
        return _na("in-process simulation: nothing travelled over a network")
    t = deployment.transport
    if t is None:
        return {"tls": None, "statement": "not recorded (the server was not started by python -m fl_server serve)"}
    if t.scheme == "https":
        return {"tls": True, "bind": t.bind, "certificate_hosts": list(t.certificate_hosts),
                "certificate_not_after": t.certificate_not_after, "certificate_sha256": t.certificate_sha256}
    return {"tls": False, "bind": t.bind,
            "statement": "plain http (loopback, or --insecure-http behind a proxy the operator is responsible for)"}


def build_record(run_dir: Path, deployment: DeploymentFacts | None = None) -> dict[str, Any]:
    """The compliance record of the run in ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    raw = summary.get("config")
    config: dict[str, Any] = raw if isinstance(raw, dict) else {}
    history = _read_csv(run_dir / "history.csv")
    mode = summary.get("mode")
    secagg = _secagg(summary, config, mode)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run": {"driver": "rest" if deployment is not None else "simulation", "mode": mode,
                "rounds_completed": summary.get("rounds_completed"), "rows_in_history_csv": len(history)},
        "left_the_clients": _left_clients(summary, history, config, mode, deployment, secagg.get("on") is True),
        "protections": {"differential_privacy": _dp(summary, config), "secure_aggregation": secagg,
                        "transport_tls": _transport(deployment)},
        "participation": (_na(f"{mode} baseline: no federation rounds") if mode in ("centralized",) else
                          _participation(run_dir, history, deployment)),
        "storage": _storage(run_dir, deployment),
        "audit_log": _na("simulation: there is no server store and no audit log") if deployment is None else {
            "events": deployment.audit.events, "first_id": deployment.audit.first_id, "last_id": deployment.audit.last_id,
            "sha256": deployment.audit.sha256,
            "digest_of": "SHA-256 of the events kept at the end of the run, oldest first, one compact JSON array "
                         "[id, at, kind, client_id, detail] per line, lines joined by newlines",
        },
        "data_subject_requests": _na("simulation: there is no client registry and no admin interface; the run folder "
                                     "is the operator's to keep or delete") if deployment is None else {
            "erasures": len(deployment.erasure_receipts), "erasure_receipts": list(deployment.erasure_receipts),
            "how": "python -m fl_server admin ... clients remove CLIENT_ID (DELETE /api/v1/clients/CLIENT_ID)",
            "erased": ERASURE_SCOPE, "cannot_be_erased": ERASURE_LIMIT,
        },
        "disclaimer": "facts recorded by the software about this run; not legal advice and not a statement of compliance",
    }
    if deployment is not None and deployment.notes:
        record["notes"] = list(deployment.notes)
    return record


def write_compliance(run_dir: Path, deployment: DeploymentFacts | None = None) -> dict[str, Any]:
    """Build the record and write ``compliance.json`` (mode 0600 like the rest of a server's run folder)."""
    record = build_record(run_dir, deployment)
    atomic_write_bytes(Path(run_dir) / COMPLIANCE_JSON, json.dumps(record, indent=2, default=str).encode("utf-8"))
    return record


def _text(value: Any) -> str:
    if isinstance(value, dict) and value.get("applies") is False:
        return f"not applicable: {value.get('why')}"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return ", ".join(str(v) for v in value) or "none"
    return json.dumps(value, default=str)


def _flat(key: str, value: Any) -> list[tuple[str, str]]:
    """A record entry as table rows: a nested block (not a 'not applicable' one) one row per key, "block: key"."""
    label = key.replace("_", " ")
    if isinstance(value, dict) and value and value.get("applies") is not False:
        return [(f"{label}: {str(k).replace('_', ' ')}", _text(v)) for k, v in value.items()]
    return [(label, _text(value))]


def section_rows(record: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The record as (group title, [(item, text), ...]) for the report's "Compliance record" section."""
    groups: list[tuple[str, list[tuple[str, str]]]] = []
    titles = (("left_the_clients", "What left the clients"), ("protections", "Protections in force"),
              ("participation", "Who took part"), ("storage", "Where state is kept, and for how long"),
              ("audit_log", "Audit log"), ("data_subject_requests", "Data-subject requests"))
    for key, title in titles:
        value = record.get(key)
        if isinstance(value, dict) and value.get("applies") is not False:
            items: Iterable[tuple[str, Any]] = value.items()
            if key == "participation":
                items = [(k, v) for k, v in value.items() if k not in ("per_round", "pseudonymous_ids", "took_part")]
                ids = [str(i) for i in value.get("pseudonymous_ids") or []]
                shown = ", ".join(ids[:MAX_IDS_SHOWN]) + (f" and {len(ids) - MAX_IDS_SHOWN} more (all in {COMPLIANCE_JSON})"
                                                          if len(ids) > MAX_IDS_SHOWN else "")
                items = [*items, ("pseudonymous ids", shown or "none"),
                         *[(f"round {r['round']}", f"selected {r['selected']}, arrived {r['arrived']}, aggregated "
                                                   f"{r['aggregated']}") for r in value.get("per_round", [])]]
            groups.append((title, [row for k, v in items for row in _flat(str(k), v)]))
        else:
            groups.append((title, [("status", _text(value))]))
    return groups


__all__ = ["COMPLIANCE_JSON", "DP_MEANING", "ERASURE_EVENT", "ERASURE_LIMIT", "ERASURE_SCOPE", "TRANSPORT_JSON", "AuditDigest",
           "AuditEvent", "DeploymentFacts", "TransportRecord", "build_record", "erasure_detail", "read_transport_record",
           "receipt_of", "section_rows", "write_compliance", "write_transport_record"]
