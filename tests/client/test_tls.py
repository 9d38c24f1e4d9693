"""The daemon's transport rules (fl_client/tls.py): https verified, plain http only to loopback unless told."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_daemon_refuses_plain_http_to_another_host_with_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fl_client", "--server-url", "http://10.255.255.1:8080", "--state-dir",
                          str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "refusing plain http to 10.255.255.1" in out.stderr
    assert not (tmp_path / "state").exists(), "nothing was set up before the refusal"
