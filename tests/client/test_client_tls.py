"""The daemon's transport rules (fl_client/tls.py): https verified, plain http only to loopback unless told."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_client.__main__ import main as client_main
from fl_client.tls import ENV_CA_FILE, TransportRefused, transport_security
from fl_common.crypto.tls import ensure_tls


def test_plain_http_is_for_loopback_only(tmp_path: Path) -> None:
    for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"):
        assert transport_security(url, environ={}).verify is True
    for url in ("http://10.0.0.5:8080", "http://fl.example.org", "http://0.0.0.0:8080"):
        with pytest.raises(TransportRefused, match="refusing plain http"):
            transport_security(url, environ={})
        assert "NOT ENCRYPTED" in transport_security(url, insecure_http=True, environ={}).description


def test_https_verifies_against_the_ca_file_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    ca = str(ensure_tls(tmp_path, "fl.example.org").files.ca_cert)
    assert transport_security("https://fl.example.org", environ={}).verify is True  # the system trust store
    assert transport_security("https://fl.example.org", ca, environ={}).verify == ca
    assert transport_security("https://fl.example.org", environ={ENV_CA_FILE: ca}).verify == ca
    with pytest.raises(TransportRefused, match="cannot read the CA file"):
        transport_security("https://fl.example.org", str(tmp_path / "missing.pem"), environ={})
    with pytest.raises(TransportRefused, match="holds no PEM certificate"):
        transport_security("https://fl.example.org", str(tmp_path / "server-key.pem"), environ={})


def test_the_daemon_refuses_plain_http_to_another_host_with_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--server-url", "http://10.255.255.1:8080", "--state-dir", str(tmp_path / "state")]
    assert client_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing plain http to 10.255.255.1" in err
    assert not (tmp_path / "state").exists(), "nothing was set up before the refusal"
    # a CA file that is not one is refused the same way, before anything starts
    assert client_main(["--server-url", "https://10.255.255.1:8080", "--ca-file", str(tmp_path / "none.pem")]) == 2
    assert "cannot read the CA file" in capsys.readouterr().err
