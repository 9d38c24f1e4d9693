"""HTTPS by default: a real server on loopback with the CA and certificate of ``tls-init``.

One server for the module (the Flask app in werkzeug's threaded server with an SSL context; the
gunicorn path, ``serve --certfile/--keyfile`` with daemons verifying the generated CA, is the demo's
end-to-end test, tests/e2e/test_demo.py): a scripted client verifying against the generated CA
registers and polls; a client holding another CA, or none, is refused at the handshake; ``serve``
on a non-loopback address without a certificate exits with one line before it binds anything.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from fl_common.crypto.tls import TlsFiles, ensure_tls
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
from fl_server.__main__ import main as server_main
from fl_server.compliance import TransportRecord, read_transport_record, write_transport_record
from tests.e2e.harness import ScriptedClient, threaded_server, token_env
from tests.e2e.scripted_rounds import tiny_cfg


def _tls_init(out: Path, hosts: str) -> dict:
    """``python -m fl_server tls-init`` (its main(), in this process: the CLI is the same code, a new interpreter costs ~10 s)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert server_main(["tls-init", "--out", str(out), "--hosts", hosts]) == 0
    return json.loads(printed.getvalue())


@dataclass
class HttpsServer:
    url: str
    port: int
    files: TlsFiles
    env: dict[str, str]


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsServer]:
    root = tmp_path_factory.mktemp("tls")
    made = _tls_init(root / "tls", "127.0.0.1,localhost")
    assert made["ca_created"] and made["server_created"] and made["hosts"] == ["127.0.0.1", "localhost"]
    files = TlsFiles.in_dir(root / "tls")
    env = token_env()
    with threaded_server(tiny_cfg(num_clients=2), root / "srv", env, tls=(str(files.server_cert), str(files.server_key))) \
            as (url, _service):
        yield HttpsServer(url, int(url.rsplit(":", 1)[1]), files, env)


def test_clients_trusting_the_generated_ca_talk_https(https_server: HttpsServer) -> None:
    server, ca = https_server, str(https_server.files.ca_cert)
    assert server.url.startswith("https://127.0.0.1:")
    client = ScriptedClient(server.url, server.env[ENV_ENROLLMENT_TOKEN], "tls-a", verify=ca)
    assert "state" in client.status()  # a signed, authenticated call over the verified connection
    assert requests.get(f"{server.url}/status", verify=ca, timeout=10).json()["clients"]["registered"] >= 1
    # the host name in the certificate works too (SAN "localhost")
    assert requests.get(f"https://localhost:{server.port}/health", verify=ca, timeout=10).status_code == 200


def test_serve_records_its_transport_for_the_compliance_record(https_server: HttpsServer, tmp_path: Path) -> None:
    files = https_server.files
    write_transport_record(tmp_path / "state", host="0.0.0.0", port=8443, certfile=str(files.server_cert))
    transport = read_transport_record(tmp_path / "state")
    assert transport is not None and (transport.scheme, transport.bind) == ("https", "0.0.0.0:8443")
    assert transport.certificate_hosts == ("127.0.0.1", "localhost")
    write_transport_record(tmp_path / "plain", host="127.0.0.1", port=8080, certfile=None)
    assert read_transport_record(tmp_path / "plain") == TransportRecord("http", "127.0.0.1:8080")


def test_a_client_with_another_ca_or_none_is_refused(https_server: HttpsServer, tmp_path: Path) -> None:
    server = https_server
    other_ca = str(ensure_tls(tmp_path / "other", "127.0.0.1").files.ca_cert)  # same host, another CA
    for verify in (other_ca, True):
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{server.url}/health", verify=verify, timeout=10)
    with pytest.raises(Exception, match="SSL|certificate"):
        ScriptedClient(server.url, server.env[ENV_ENROLLMENT_TOKEN], "tls-b", verify=other_ca)
    # plain http to the https port gets no answer a client could mistake for the server's
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/health", timeout=10)


def test_serve_on_all_interfaces_without_a_certificate_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for host in ("0.0.0.0", "::", "10.0.0.5"):
        assert server_main(["serve", "--host", host, "--port", "1", "--state-dir", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--host {host} is reachable from other machines" in err and "--insecure-http" in err
    assert not (tmp_path / "s").exists(), "refused before anything was created or bound"


def test_the_admin_cli_refuses_plain_http_to_another_host(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV_ADMIN_TOKEN, "not-sent-anywhere")
    assert server_main(["admin", "--server-url", "http://10.255.255.1:8080", "clients", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing plain http to 10.255.255.1" in err and "admin token" in err
