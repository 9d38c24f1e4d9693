"""The security audit log: the admin endpoint and ``python -m fl_server audit``, against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests

from fl_common.protocol.rest import ENV_ADMIN_TOKEN
from tests.e2e.harness import threaded_server, token_env
from tests.e2e.scripted_rounds import register, tiny_cfg


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl_server", "audit", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_audit_log_over_http_and_on_the_command_line(tmp_path: Path) -> None:
    env = token_env()
    state = tmp_path / "srv"
    with threaded_server(tiny_cfg(), state, env) as (url, _):
        register(url, env, 1, prefix="alice")
        wrong_enrollment = "not-the-enrollment-token-at-all"
        r = requests.post(f"{url}/api/v1/register", json={"enrollment_token": wrong_enrollment, "public_key": "x"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "bad_enrollment_token"
        wrong_admin = "definitely-not-the-admin-token"
        r = requests.get(f"{url}/api/v1/audit", headers={"Authorization": f"Bearer {wrong_admin}"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "bad_admin_token"
        admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
        events = requests.get(f"{url}/api/v1/audit", headers=admin, timeout=10).json()["events"]
        kinds = [e["kind"] for e in events]  # newest first
        assert kinds == ["bad_admin_token", "bad_enrollment_token", "registered"]
        assert events[-1]["client_id"].startswith("c-") and "name=alice0" in events[-1]["detail"]
        one = requests.get(f"{url}/api/v1/audit?limit=1", headers=admin, timeout=10).json()["events"]
        assert [e["kind"] for e in one] == ["bad_admin_token"]
        bad = requests.get(f"{url}/api/v1/audit?limit=0", headers=admin, timeout=10)
        assert bad.status_code == 400 and bad.json() == {"error": "bad_limit",
                                                         "message": "limit must be an integer from 1 to 10000"}
        text = json.dumps(events)
        for secret in (wrong_enrollment, wrong_admin, *env.values()):
            assert secret not in text, "a token reached the audit log"

        # the CLI reads the same store, read-only, next to the running server; oldest first
        out = _cli("--state-dir", str(state))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert [line.split()[1] for line in lines] == ["registered", "bad_enrollment_token", "bad_admin_token"]
        as_json = [json.loads(line) for line in _cli("--state-dir", str(state), "--json").stdout.splitlines()]
        assert [e["kind"] for e in as_json] == ["registered", "bad_enrollment_token", "bad_admin_token"]
        assert all(e["time"].endswith("+00:00") for e in as_json)
        only = _cli("--state-dir", str(state), "--kind", "registered", "--json").stdout.splitlines()
        assert [json.loads(line)["kind"] for line in only] == ["registered"]


def test_audit_cli_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    out = _cli("--state-dir", str(tmp_path / "nothing-here"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no server store" in out.stderr
    assert not (tmp_path / "nothing-here").exists(), "reading the audit log must not create a store"
    out = _cli("--state-dir", str(tmp_path), "--limit", "0")
    assert out.returncode == 2 and "--limit" in out.stderr
