"""docker-compose.yml and docker/ checked without a Docker engine.

The compose file is read with PyYAML; the commands it runs are checked against the real command
lines (`python -m fl_server serve --help`, `python -m fl_client --help`, and the argparse parsers
themselves), the config it mounts is validated with the project's own loader, and the Dockerfile
is checked for what the compose file relies on. When docker-compose (v1) or `docker compose` (v2)
is installed, `config -q` is run as well; otherwise that one test is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SERVER_YAML = ROOT / "docker" / "server.yaml"
SECRET_VARS = ("FL_ENROLLMENT_TOKEN", "FL_ADMIN_TOKEN", "FL_SERVER_SECRET")
DUMMY_ENV = {"FL_ENROLLMENT_TOKEN": "e" * 32, "FL_ADMIN_TOKEN": "a" * 32, "FL_SERVER_SECRET": "s" * 40}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def interpolate(text: str) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ with the dummy secrets and defaults."""
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in DUMMY_ENV:
            return DUMMY_ENV[name]
        if op and op.endswith("-"):
            return arg
        raise AssertionError(f"${{{name}}} has no default and is not a known secret")
    return "$".join(_VAR.sub(sub, part) for part in text.split("$$"))


def argv_of(svc: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The argv the container runs, with `sh -c 'exec ...'` unwrapped and $VARs of the container filled in."""
    cmd = svc["command"]
    args = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
    args = [interpolate(a) for a in args]
    if args[:2] == ["sh", "-c"]:
        assert len(args) == 3, args
        script = args[2]
        for name, value in env.items():
            script = script.replace(f"${{{name}}}", value).replace(f"${name}", value)
        args = shlex.split(script)
        assert args[0] == "exec", f"the shell must exec the program (signals reach it, PID 1): {script!r}"
        args = args[1:]
    return args


def container_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    values = {k: interpolate(str(v)) for k, v in env.items()}
    values.setdefault("HOSTNAME", "0123456789ab")  # set by Docker in every container
    return values


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@cache
def help_text(*module_args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *module_args, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def server_argv() -> list[str]:
    svc = service("server")
    return argv_of(svc, container_env(svc))


def client_argv() -> list[str]:
    svc = service("client")
    return argv_of(svc, container_env(svc))


# ----------------------------------------------------------------------------- structure
def test_services_exist() -> None:
    assert {"server", "client"} <= set(compose()["services"])


def test_client_can_scale() -> None:
    client = service("client")
    assert "container_name" not in client, "a fixed container_name prevents --scale client=N"
    assert "ports" not in client, "published ports prevent --scale client=N"
    assert "hostname" not in client, "a fixed hostname would give every replica the same --client-id"
    assert "--partition" in client_argv() and option(client_argv(), "--partition") == "auto"


def test_client_waits_for_a_healthy_server_and_restarts_on_failure() -> None:
    client = service("client")
    assert client["depends_on"]["server"]["condition"] == "service_healthy"
    assert str(client["restart"]).startswith("on-failure")


def test_server_healthcheck() -> None:
    server = service("server")
    check = server["healthcheck"]
    assert not check.get("disable")
    test = check["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    script = next(t for t in test if t.endswith(".py"))
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(rf"^COPY\s+docker/healthcheck\.py\s+{re.escape(script)}\s*$", text, re.M), \
        f"the healthcheck runs {script}, which the Dockerfile must install"
    assert (ROOT / "docker" / "healthcheck.py").is_file()
    assert re.search(r"^HEALTHCHECK\b", text, re.M)


def test_server_port_and_client_url_agree() -> None:
    port = option(server_argv(), "--port")
    assert option(server_argv(), "--host") == "0.0.0.0", "the server must listen beyond its container's loopback"
    published = [str(p) for p in service("server")["ports"]]
    assert any(interpolate(p).endswith(f":{port}") for p in published), published
    url = option(client_argv(), "--server-url")
    assert url == f"http://server:{port}", url


def test_server_state_lives_in_a_named_volume() -> None:
    state_dir = option(server_argv(), "--state-dir")
    mounts = [str(v) for v in service("server")["volumes"]]
    named = {m.split(":")[0] for m in mounts if m.split(":")[1] == state_dir}
    assert named, f"--state-dir {state_dir} is not a mount point: {mounts}"
    assert named <= set(compose().get("volumes") or {}), f"{named} must be declared under top-level volumes"


def test_server_config_is_mounted_and_baked_in() -> None:
    config = option(server_argv(), "--config")
    mounts = [str(v) for v in service("server")["volumes"]]
    assert any(m.split(":")[0] == "./docker/server.yaml" and m.split(":")[1] == config for m in mounts), mounts
    assert re.search(rf"^COPY\s+docker/server\.yaml\s+{re.escape(config)}\s*$", DOCKERFILE.read_text(), re.M)


# ----------------------------------------------------------------------------- secrets
def test_no_secrets_committed() -> None:
    for name in ("server", "client"):
        env = service(name).get("environment") or {}
        for key, value in env.items():
            if any(word in key.upper() for word in ("TOKEN", "SECRET", "PASSWORD", "KEY")):
                m = re.fullmatch(r"\$\{(\w+):\?[^}]*\}", str(value))
                assert m and m.group(1) == key, f"{name}.{key} must be ${{{key}:?...}} (required, no default), got {value!r}"
    server_env = service("server")["environment"]
    assert set(SECRET_VARS) <= set(server_env)
    assert "FL_ENROLLMENT_TOKEN" in service("client")["environment"]
    text = COMPOSE.read_text(encoding="utf-8")
    for var in SECRET_VARS:
        assert not re.search(rf"\$\{{{var}:?-", text), f"{var} has a default value in docker-compose.yml"


def test_no_env_file_tracked() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--", ".env", "*/.env"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "", f"secrets file tracked by git: {out.stdout}"


# ----------------------------------------------------------------------------- commands vs the real CLIs
def test_server_command_uses_real_flags() -> None:
    args = server_argv()
    assert args[:4] == ["python", "-m", "fl_server", "serve"], args
    text = help_text("fl_server", "serve")
    for flag in flags(args):
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", text), f"server flag {flag} is not in 'fl_server serve --help'"
    from fl_server.__main__ import build_parser

    parsed = build_parser().parse_args(args[3:])  # exits with status 2 on anything it does not know
    assert parsed.command == "serve" and parsed.port == 8080


def test_client_command_uses_real_flags() -> None:
    args = client_argv()
    assert args[:3] == ["python", "-m", "fl_client"], args
    text = help_text("fl_client")
    for flag in flags(args):
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", text), f"client flag {flag} is not in 'fl_client --help'"
    from fl_client.__main__ import build_parser

    parsed = build_parser().parse_args(args[3:])
    assert parsed.partition is None  # auto
    assert parsed.client_name == "0123456789ab"  # the container's hostname: distinct per replica
    assert parsed.threads == 1


def test_mounted_server_config_is_valid() -> None:
    from fl_common.config import load_config

    cfg = load_config(SERVER_YAML, [])
    raw = yaml.safe_load(SERVER_YAML.read_text(encoding="utf-8"))
    # private by default, explicitly: the card's pipeline, with the DP recipe's training settings (no model chosen)
    assert raw["differential_privacy"] is True and raw["secure_aggregation"] is True and "model_type" not in raw
    assert (cfg.dp_mode, cfg.dp_epsilon, cfg.dp_delta, cfg.codec, cfg.encryption) == ("sample", 1.0, 1e-5, "int8", True)
    assert (cfg.dataset, cfg.model_type, cfg.num_clients, cfg.client_selection_ratio) == ("fashion_mnist", "cnn", 10, 1.0)
    assert (cfg.batch_size, cfg.learning_rate, cfg.lr_schedule) == (64, 0.05, "cosine")
    assert cfg.poll_interval == 1 and cfg.round_timeout >= 600 and cfg.num_rounds <= 20
    assert cfg.round_start_wait >= 120  # containers start at different times: wait for all of them
    # The smoke test's overrides must be valid too.
    load_config(SERVER_YAML, ["num_clients=3", "num_rounds=2", "max_train_samples=6000", "max_test_samples=2000"])


# ----------------------------------------------------------------------------- Dockerfile and scripts
def test_dockerfile_basics() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"^ARG WHEELS=", text, re.M) and "--no-index --find-links" in text
    assert "dataset-fashion-mnist" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    for path in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+\s*$", text, re.M):
        for src in path.split():
            if "$" not in src:
                assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"


def test_smoke_test_script_parses() -> None:
    script = ROOT / "docker" / "smoke-test.sh"
    assert os.access(script, os.X_OK), "docker/smoke-test.sh must be executable"
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- the real compose tool
def _compose_cmd() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config() -> None:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither 'docker compose' nor 'docker-compose' is installed; the YAML checks above still ran")
    base = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    run = lambda env: subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=120)
    ok = run({**base, **DUMMY_ENV})
    assert ok.returncode == 0, ok.stderr
    if not (ROOT / ".env").exists():  # a local .env would supply the secrets
        missing = run(base)
        assert missing.returncode != 0 and "FL_" in missing.stderr, "compose must refuse to start without the secrets"
