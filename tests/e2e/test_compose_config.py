"""docker-compose.yml and docker/ checked without a Docker engine.

The compose file is read with PyYAML; the commands it runs are checked against the real command
lines (`python -m fl_server serve --help`, `python -m fl_client --help`, and the argparse parsers
themselves), the config it mounts is validated with the project's own loader, and the Dockerfile
is checked for what the compose file relies on. The TLS wiring (tls-init's files are what the
server serves; the CA reaches the clients and Prometheus read-only) and the volumes are checked
against each other. docker/README.md's commands are checked against the scripts that the smoke
test runs (`docker/build-image.sh --dry-run` prints what it would run). When docker-compose (v1)
or `docker compose` (v2) is installed, `config -q` is run as well; otherwise that one test is
skipped with the reason.
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
BUILD_SCRIPT = ROOT / "docker" / "build-image.sh"
SMOKE_SCRIPT = ROOT / "docker" / "smoke-test.sh"
DOCKER_README = ROOT / "docker" / "README.md"
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
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


def shell_expand(script: str, env: dict[str, str]) -> str:
    """The container shell's ${VAR}, ${VAR:+word} and $VAR, filled in from the container's environment."""
    def sub(m: re.Match[str]) -> str:
        value = env.get(m.group(1), "")
        if m.group(2) is not None:  # ${VAR:+word}
            return shell_expand(m.group(2), env) if value else ""
        return value
    script = re.sub(r"\$\{(\w+)(?::\+((?:[^{}]|\{[^{}]*\})*))?\}", sub, script)
    return re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), script)


def steps_of(svc: dict[str, Any], env: dict[str, str]) -> list[list[str]]:
    """The argvs the container runs in order: `sh -c 'a && b && exec c'` unwrapped, $VARs filled in."""
    cmd = svc["command"]
    args = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
    args = [interpolate(a) for a in args]
    if args[:2] != ["sh", "-c"]:
        return [args]
    assert len(args) == 3, args
    steps = [shlex.split(part) for part in shell_expand(args[2], env).split("&&")]
    assert steps[-1][0] == "exec", f"the shell must exec the program (signals reach it, PID 1): {args[2]!r}"
    assert all(s and s[0] != "exec" for s in steps[:-1]), steps
    steps[-1] = steps[-1][1:]
    return steps


def argv_of(svc: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The argv of the program the container ends up running (PID 1)."""
    return steps_of(svc, env)[-1]


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
    assert url == f"https://server:{port}", url


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


def smoke_server_args() -> list[str]:
    """The FL_SERVER_ARGS docker/smoke-test.sh exports, with its CLIENTS and ROUNDS filled in."""
    text = SMOKE_SCRIPT.read_text(encoding="utf-8")
    values = dict(re.findall(r"^(CLIENTS|ROUNDS)=(\d+)$", text, re.M))
    (line,) = re.findall(r'^export FL_SERVER_ARGS="([^"]*)"$', text, re.M)
    return shlex.split(shell_expand(line, values))


def test_mounted_server_config_is_valid() -> None:
    from fl_common.config import load_config

    cfg = load_config(SERVER_YAML, [])
    raw = yaml.safe_load(SERVER_YAML.read_text(encoding="utf-8"))
    # private by default, explicitly: the card's pipeline, with the DP recipe's training settings (no model chosen)
    assert raw["differential_privacy"] is True and raw["secure_aggregation"] is True and "model_type" not in raw
    assert (cfg.dp_mode, cfg.dp_epsilon, cfg.dp_delta, cfg.codec, cfg.encryption) == ("sample", 1.0, 1e-5, "int8", True)
    assert (cfg.dataset, cfg.model_type, cfg.num_clients, cfg.client_selection_ratio) == ("fashion_mnist", "scatter_linear", 10, 1.0)
    assert (cfg.batch_size, cfg.learning_rate, cfg.lr_schedule) == (256, 0.4, "cosine")
    assert cfg.poll_interval == 1 and cfg.round_timeout >= 600 and cfg.num_rounds <= 20
    assert cfg.round_start_wait >= 120  # containers start at different times: wait for all of them
    # The smoke test's overrides, read from the script, are valid server flags and a valid config.
    args = smoke_server_args()
    assert args[::2] == ["--set"] * (len(args) // 2) and len(args) % 2 == 0, args
    smoke = load_config(SERVER_YAML, args[1::2])
    assert (smoke.num_clients, smoke.num_rounds) == (3, 2)


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


# ----------------------------------------------------------------------------- TLS and volumes
def _mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only) of a service's volumes (anonymous ones have source "")."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):  # long syntax
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only")))
            continue
        parts = str(v).split(":")
        if len(parts) == 1:
            out[parts[0]] = ("", False)
        else:
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def tls_init_argv() -> list[str]:
    svc = service("server")
    steps = steps_of(svc, container_env(svc))
    (init,) = [s for s in steps if s[:4] == ["python", "-m", "fl_server", "tls-init"]]
    return init


def test_server_serves_https_with_the_certificate_tls_init_makes() -> None:
    args, init = server_argv(), tls_init_argv()
    out = option(init, "--out")
    state_dir = option(args, "--state-dir")
    assert out and state_dir and out.startswith(f"{state_dir}/"), "the CA and key live in the state volume"
    assert option(args, "--certfile") == f"{out}/server.pem" and option(args, "--keyfile") == f"{out}/server-key.pem"
    hosts = (option(init, "--hosts") or "").split(",")
    url_host = (option(client_argv(), "--server-url") or "").split("://")[1].split(":")[0]
    assert url_host in hosts and "localhost" in hosts and "" not in hosts, hosts
    svc = service("server")
    with_extra = steps_of(svc, {**container_env(svc), "FL_TLS_HOSTS": "fl.example.org,10.0.0.5"})
    (init2,) = [s for s in with_extra if s[:4] == ["python", "-m", "fl_server", "tls-init"]]
    assert (option(init2, "--hosts") or "").split(",") == [*hosts, "fl.example.org", "10.0.0.5"]
    from fl_server.__main__ import build_parser

    if not re.search(r"[{,]tls-init[,}]", build_parser().format_help()):
        pytest.skip("`python -m fl_server tls-init` is not in this checkout yet (issue 18's TLS part); its flags are unchecked")
    build_parser().parse_args(init[3:])


def test_the_ca_reaches_clients_and_prometheus_read_only() -> None:
    svc = service("server")
    steps = steps_of(svc, container_env(svc))
    out = option(tls_init_argv(), "--out")
    (copy,) = [s for s in steps if s and s[0] in ("cp", "install")]
    assert copy[-2] == f"{out}/ca.pem", copy
    ca_dir = str(Path(copy[-1]).parent)
    server_mounts = _mounts(service("server"))
    volume, read_only = server_mounts[ca_dir]
    assert volume in (compose().get("volumes") or {}) and not read_only
    assert server_mounts[ca_dir][0] != server_mounts[option(server_argv(), "--state-dir") or ""][0], \
        "the CA's volume must not be the state volume (the server's key and secrets are there)"
    client_env = container_env(service("client"))
    assert client_env["FL_CA_FILE"] == copy[-1]
    assert _mounts(service("client"))[ca_dir] == (volume, True)
    prom = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    (job,) = prom["scrape_configs"]
    assert job["scheme"] == "https"
    ca_file = Path(job["tls_config"]["ca_file"])
    assert _mounts(service("prometheus"))[str(ca_file.parent)] == (volume, True) and ca_file.name == Path(copy[-1]).name
    assert re.search(rf"install -d -o fl -g fl -m 0755 {re.escape(ca_dir)}\b", DOCKERFILE.read_text(encoding="utf-8")), \
        "the image must hold the CA folder, owned by fl, so that a fresh named volume on it is writable by the server"


def test_named_volumes_belong_to_the_federation_only() -> None:
    """docker-compose v1 creates every top-level volume on any `up`: the monitoring profile's must not be among them."""
    named = set(compose().get("volumes") or {})
    used = {src for name in ("server", "client") for src, _ in _mounts(service(name)).values() if src in named}
    assert used == named, f"top-level volumes not used by the federation: {named - used}"
    for name in ("prometheus", "grafana"):
        for path, (src, _) in _mounts(service(name)).items():
            assert src in named or src.startswith("./") or src == "", (name, path, src)
            if src == "":
                assert path in ("/prometheus", "/var/lib/grafana"), path
    for name, target in (("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")):
        assert _mounts(service(name))[target] == ("", False), f"{name} keeps its data in an anonymous volume"


# ----------------------------------------------------------------------------- the documented routes are the tested ones
def all_options(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def _dry_run() -> tuple[list[str], list[str]]:
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("FL_BUILD_")}, "FL_BUILD_WORK": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    pip, build = (shlex.split(line) for line in out.stdout.strip().splitlines())
    return pip, build


def test_build_script_downloads_every_requirement_for_the_four_platforms() -> None:
    import tomllib

    pip, build = _dry_run()
    assert pip[:4] == ["python3", "-m", "pip", "download"] and "--only-binary=:all:" in pip
    platforms = [pip[i + 1] for i, a in enumerate(pip) if a == "--platform"]
    assert platforms == ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    wanted = [d for d in deps if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() not in ("torch", "torchvision")]
    assert "matplotlib>=3.7" in wanted
    for dep in wanted:
        assert dep in pip, f"build-image.sh does not download {dep}"
    assert any(a.startswith("torch==") for a in pip) and "setuptools>=68" in pip and "wheel" in pip
    # the build: the Dockerfile, the local base, the wheel folder, and the tag compose runs
    assert build[:2] == ["docker", "build"] and (option(build, "-f") or "").endswith("/docker/Dockerfile")
    image = interpolate(compose()["x-image"])
    assert option(build, "-t") == image == "federated-learning-hub:latest"
    args = dict(a.split("=", 1) for a in all_options(build, "--build-arg"))
    assert args["BASE_IMAGE"] == "fl-base:local" and args["WHEELS"] == "wheels"
    assert args["TORCH_PACKAGES"] == next(a for a in pip if a.startswith("torch=="))
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    for name in args:
        assert re.search(rf"^ARG {name}\b", dockerfile, re.M), f"--build-arg {name} is not an ARG of the Dockerfile"



def test_build_script_tag_and_network_options() -> None:
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--dry-run", "--tag", "x:y", "--network", "host"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    build = shlex.split(out.stdout.strip().splitlines()[1])
    assert option(build, "-t") == "x:y" and option(build, "--network") == "host"
    bad = subprocess.run(["bash", str(BUILD_SCRIPT), "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_smoke_test_builds_through_the_documented_script() -> None:
    text = SMOKE_SCRIPT.read_text(encoding="utf-8")
    assert re.search(r'"\$REPO/docker/build-image\.sh" --tag "\$IMAGE"', text), "the smoke test must build with build-image.sh"
    assert "pip download" not in text and "debootstrap --" not in text, "one build recipe: build-image.sh's"
    # it runs the compose file as it is (no override file replacing the server's command)
    assert not re.search(r"-f \"\$OVERRIDE\"|override\.yml", text)


def test_readme_commands_are_the_tested_ones() -> None:
    text = DOCKER_README.read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    # building without a registry is the script, not a hand-written pip/docker recipe that can drift
    assert re.search(r"^docker/build-image\.sh$", blocks, re.M)
    assert "pip download" not in blocks and "debootstrap" not in blocks and "docker import" not in blocks
    assert re.search(r"^docker/smoke-test\.sh\b", blocks, re.M)
    # the documented build variables are the script's
    script = BUILD_SCRIPT.read_text(encoding="utf-8")
    for var in set(re.findall(r"\bFL_BUILD_[A-Z_]+", text)):
        assert re.search(rf"\${{{var}\b", script), f"docker/README.md documents {var}, which build-image.sh does not read"
    # the scale in the README is num_clients of the config compose mounts
    from fl_common.config import load_config

    for n in re.findall(r"docker-compose (?:--profile monitoring )?up -d --scale client=(\d+)", text):
        assert int(n) == load_config(SERVER_YAML, []).num_clients
    # the compose variables the README names exist in the compose file
    compose_text = COMPOSE.read_text(encoding="utf-8")
    for var in set(re.findall(r"\bFL_(?:SERVER|TLS|IMAGE|PROMETHEUS|GRAFANA)[A-Z_]*", text)):
        assert var in compose_text, f"docker/README.md names {var}, which docker-compose.yml does not use"


def test_no_stale_notes() -> None:
    for path in (DOCKER_README, DOCKERFILE, SMOKE_SCRIPT, BUILD_SCRIPT, COMPOSE):
        text = path.read_text(encoding="utf-8")
        assert "scipy" not in text.lower(), f"{path.name}: scipy is declared in pyproject.toml; no workaround note belongs here"
        assert "not built yet" not in text and "(reserved)" not in text, f"{path.name} has a stale placeholder"


def test_build_script_parses_and_is_executable() -> None:
    assert os.access(BUILD_SCRIPT, os.X_OK), "docker/build-image.sh must be executable"
    out = subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_readme_secrets_command_makes_an_env_file_compose_and_the_server_accept(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """docker/README.md's Secrets block run as written; its .env passes compose's checks and the server's own."""
    from fl_server.rest.secrets import ServerSecrets

    text = DOCKER_README.read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "done > .env" in b]
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    env_file = tmp_path / ".env"
    assert env_file.stat().st_mode & 0o077 == 0, "the .env holds secrets: owner only"
    values = dict(line.split("=", 1) for line in env_file.read_text(encoding="utf-8").splitlines())
    assert set(values) == set(SECRET_VARS)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    loaded = ServerSecrets.load(tmp_path / "state")  # raises on a value the server would refuse
    assert loaded.enrollment_token == values["FL_ENROLLMENT_TOKEN"] and not (tmp_path / "state").exists()
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither 'docker compose' nor 'docker-compose' is installed; the .env was checked against the server")
    base = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    out = subprocess.run([*cmd, "-f", str(COMPOSE), "--env-file", str(env_file), "config", "-q"], cwd=ROOT, env=base,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
