"""kubernetes/ rendered with the real ``kubectl kustomize`` and checked without a cluster.

Every overlay (and the base) is rendered once per module; every object is validated against the
Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships (strict: unknown fields fail), for
the oldest and the newest Kubernetes release it knows. Then the properties a deployment relies on:
the pods run as non-root on a read-only root filesystem with requests and limits; the server is
one replica with its state on a claim, probed on ``/health``; the commands are the real CLIs'
(parsed by their own argparse parsers); pod K of the clients trains on partition K and there are
exactly ``num_clients`` of them; no secret value is in the manifests and every Secret they
reference is one kubernetes/README.md tells the operator to create, with the same keys; the
NetworkPolicies select the pods they are about; the Services, PDB, ServiceMonitor and Ingress
point at what exists.

kubectl comes from Debian's ``kubectl`` package (scripts/setup.sh installs it); without it the
module is skipped with that reason.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "kubernetes"
OVERLAYS = sorted(p.parent.relative_to(K8S).as_posix() for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base", *OVERLAYS]
SCHEMA_VERSIONS = ("1.27.0", "latest")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
#: kinds kubernetes-validate has no schema for (CRDs): checked field by field below instead
CRD_KINDS = {"ServiceMonitor"}

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")
if shutil.which("kubectl") is None:
    pytest.skip("kubectl is not installed (Debian package kubectl; scripts/setup.sh installs it)", allow_module_level=True)


Obj = dict[str, Any]


@cache
def render(target: str) -> tuple[Obj, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@cache
def rendered_text(target: str) -> str:
    return yaml.safe_dump_all(list(render(target)))


def objects(target: str, kind: str) -> list[Obj]:
    return [o for o in render(target) if o["kind"] == kind]


def one(target: str, kind: str, name: str) -> Obj:
    (found,) = [o for o in objects(target, kind) if o["metadata"]["name"] == name]
    return found


def workloads(target: str) -> list[Obj]:
    return [o for o in render(target) if o["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job")]


def containers(pod_spec: Obj) -> list[Obj]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A label selector (``matchLabels``) or a Service's plain map; an empty one would select everything."""
    assert "matchExpressions" not in selector, "extend this check for matchExpressions"
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pod_labels(target: str, name: str) -> dict[str, str]:
    return one(target, "StatefulSet", name)["spec"]["template"]["metadata"]["labels"]


def option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
    return None


def all_options(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def shell_argv(command: list[str], env: dict[str, str]) -> list[str]:
    """``sh -c 'exec prog ...'`` -> prog's argv, with ${VAR}, ${VAR##*-} and ${VAR:+...} filled in from env."""
    if command[:2] != ["sh", "-c"]:
        return command
    assert len(command) == 3, command
    script = command[2]

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op == "##*-":
            return value.rsplit("-", 1)[-1]
        if op == ":+":
            return re.sub(r"\$\{(\w+)\}", lambda n: env.get(n.group(1), ""), arg) if value else ""
        assert op is None, f"unhandled shell expansion {m.group(0)!r}"
        return value

    script = re.sub(r"\$\{(\w+)(##\*-|:\+)?((?:[^{}]|\{[^{}]*\})*)\}", sub, script)
    args = shlex.split(script)
    assert args[0] == "exec", f"the shell must exec the program (it is PID 1 and gets SIGTERM): {script!r}"
    return args[1:]


def container_env(target: str, container: Obj, hostname: str) -> dict[str, str]:
    env = {"HOSTNAME": hostname}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}) and e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace":
            env[e["name"]] = namespace_of(target)
    return env


def namespace_of(target: str) -> str:
    names = {o["metadata"].get("namespace") for o in render(target) if o["kind"] != "Namespace"}
    (ns,) = names
    return ns or "default"


def container(target: str, workload: str, name: str) -> Obj:
    (found,) = [c for c in containers(one(target, "StatefulSet", workload)["spec"]["template"]["spec"]) if c["name"] == name]
    return found


def server_argv(target: str) -> list[str]:
    c = container(target, "fl-server", "server")
    return shell_argv(c["command"], container_env(target, c, "fl-server-0"))


def client_argv(target: str, ordinal: int) -> list[str]:
    c = container(target, "fl-client", "client")
    return shell_argv(c["command"], container_env(target, c, f"fl-client-{ordinal}"))


def has_subcommand(name: str) -> bool:
    from fl_server.__main__ import build_parser

    return re.search(rf"[{{,]{re.escape(name)}[,}}]", build_parser().format_help()) is not None


# ----------------------------------------------------------------------------- rendering and schemas
@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_against_the_kubernetes_schemas(target: str) -> None:
    objs = render(target)
    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= kinds, kinds
    for version in SCHEMA_VERSIONS:
        v = kubernetes_validate.latest_version() if version == "latest" else version
        for obj in objs:
            if obj["kind"] in CRD_KINDS:
                continue
            kubernetes_validate.validate(obj, v, strict=True)  # raises ValidationError with the path of the fault


def test_the_validator_catches_a_misspelled_field() -> None:
    """The schema check above is only worth something if a typo fails it."""
    bad = copy.deepcopy(one("base", "StatefulSet", "fl-server"))
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_every_overlay_is_tested() -> None:
    assert {"overlays/dev", "overlays/production"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlay_puts_everything_in_its_own_namespace(target: str) -> None:
    ns = namespace_of(target)
    assert ns != "default"
    (namespace,) = objects(target, "Namespace")
    assert namespace["metadata"]["name"] == ns
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ----------------------------------------------------------------------------- pod security
@pytest.mark.parametrize("target", TARGETS)
def test_pods_are_non_root_with_a_read_only_root_filesystem(target: str) -> None:
    """What the "restricted" Pod Security Standard asks, plus resources and no API token."""
    for w in workloads(target):
        spec = w["spec"]["template"]["spec"]
        name = w["metadata"]["name"]
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["runAsGroup"] != 0, name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for c in containers(spec):
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert csc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add"), (name, c["name"])
            assert not csc.get("privileged"), (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            # read-only root: /tmp is a volume, and HOME / caches point into it
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, (name, c["name"])
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= {"configMap", "secret", "emptyDir", "persistentVolumeClaim", "projected"}, volume
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("HOME", "").startswith("/tmp") and env.get("MPLCONFIGDIR", "").startswith("/tmp"), (name, env)


# ----------------------------------------------------------------------------- the server
@pytest.mark.parametrize("target", TARGETS)
def test_server_is_one_replica_with_its_state_on_a_claim(target: str) -> None:
    sts = one(target, "StatefulSet", "fl-server")
    assert sts["spec"]["replicas"] == 1
    args = server_argv(target)
    state_dir = option(args, "--state-dir")
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container(target, "fl-server", "server")["volumeMounts"]}
    assert mounts.get(state_dir) in claims, f"--state-dir {state_dir} is not on a PersistentVolumeClaim: {mounts}"


@pytest.mark.parametrize("target", TARGETS)
def test_server_command_is_the_real_cli_and_serves_https(target: str) -> None:
    from fl_server.__main__ import build_parser

    args = server_argv(target)
    assert args[:4] == ["python", "-m", "fl_server", "serve"], args
    parsed = build_parser().parse_args(args[3:])  # exits with status 2 on any flag it does not know
    assert parsed.host == "0.0.0.0" and parsed.certfile and parsed.keyfile
    state_dir = option(args, "--state-dir")
    assert parsed.certfile.startswith(f"{state_dir}/") and parsed.keyfile.startswith(f"{state_dir}/")
    # the config file is the ConfigMap's, mounted where --config looks
    config = Path(option(args, "--config") or "")
    c = container(target, "fl-server", "server")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config.parent)]
    spec = one(target, "StatefulSet", "fl-server")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    cm = one(target, "ConfigMap", volume["configMap"]["name"])
    assert config.name in cm["data"]


@pytest.mark.parametrize("target", TARGETS)
def test_tls_init_writes_the_files_the_server_serves(target: str) -> None:
    init = container(target, "fl-server", "tls-init")
    args = shell_argv(init["command"], container_env(target, init, "fl-server-0"))
    assert args[:4] == ["python", "-m", "fl_server", "tls-init"], args
    out = option(args, "--out")
    server = server_argv(target)
    assert option(server, "--certfile") == f"{out}/server.pem" and option(server, "--keyfile") == f"{out}/server-key.pem"
    hosts = (option(args, "--hosts") or "").split(",")
    ns = namespace_of(target)
    for name in ("fl-server", f"fl-server.{ns}.svc", f"fl-server.{ns}.svc.cluster.local"):
        assert name in hosts, f"the certificate must name the Service as clients reach it: {name} not in {hosts}"
    assert "" not in hosts, hosts
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    server_mounts = {m["mountPath"]: m["name"] for m in container(target, "fl-server", "server")["volumeMounts"]}
    state_dir = option(server, "--state-dir") or ""
    assert out.startswith(f"{state_dir}/") and init_mounts[state_dir] == server_mounts[state_dir]
    if not has_subcommand("tls-init"):
        pytest.skip("`python -m fl_server tls-init` is not in this checkout yet (issue 18's TLS part); its flags are unchecked")
    from fl_server.__main__ import build_parser

    build_parser().parse_args(args[3:])


@pytest.mark.parametrize("target", TARGETS)
def test_server_probes_health_on_its_port(target: str) -> None:
    c = container(target, "fl-server", "server")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"https": int(option(server_argv(target), "--port") or 0)}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports and get["scheme"] == "HTTPS", (probe, get)


@pytest.mark.parametrize("target", TARGETS)
def test_prometheus_annotations_point_at_metrics(target: str) -> None:
    meta = one(target, "StatefulSet", "fl-server")["spec"]["template"]["metadata"]
    ann = meta["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert ann["prometheus.io/port"] == option(server_argv(target), "--port")
    assert ann["prometheus.io/scheme"] == "https"


@pytest.mark.parametrize("target", TARGETS)
def test_pdb_covers_the_server(target: str) -> None:
    (pdb,) = objects(target, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels(target, "fl-server"))
    assert not selects(pdb["spec"]["selector"], pod_labels(target, "fl-client"))
    assert pdb["spec"].get("maxUnavailable") == 0 or pdb["spec"].get("minAvailable") == 1


# ----------------------------------------------------------------------------- the clients
def server_config(target: str) -> Any:
    """The server's configuration as it will run: the ConfigMap's file plus the --set overrides."""
    from fl_common.config import load_config

    args = server_argv(target)
    c = container(target, "fl-server", "server")
    spec = one(target, "StatefulSet", "fl-server")["spec"]["template"]["spec"]
    config = Path(option(args, "--config") or "")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    text = one(target, "ConfigMap", volume["configMap"]["name"])["data"][config.name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / config.name
        path.write_text(text, encoding="utf-8")
        return load_config(path, all_options(args, "--set"))


@pytest.mark.parametrize("target", TARGETS)
def test_one_client_pod_per_partition(target: str) -> None:
    """replicas = num_clients, and pod K (hostname fl-client-K) asks for partition K under a stable name."""
    from fl_client.__main__ import build_parser

    cfg = server_config(target)
    replicas = one(target, "StatefulSet", "fl-client")["spec"]["replicas"]
    assert replicas == cfg.num_clients, f"{replicas} client pods for num_clients={cfg.num_clients}"
    for k in (0, replicas - 1):
        args = client_argv(target, k)
        assert args[:3] == ["python", "-m", "fl_client"], args
        parsed = build_parser().parse_args(args[3:])
        assert parsed.partition == k and parsed.client_name == f"fl-client-{k}"
        state = parsed.state_dir
        mounts = {m["mountPath"]: m["name"] for m in container(target, "fl-client", "client")["volumeMounts"]}
        claims = {t["metadata"]["name"] for t in one(target, "StatefulSet", "fl-client")["spec"]["volumeClaimTemplates"]}
        assert mounts.get(str(state)) in claims, "the client's credentials must survive a rescheduled pod"


@pytest.mark.parametrize("target", TARGETS)
def test_clients_reach_the_service_over_verified_https(target: str) -> None:
    c = container(target, "fl-client", "client")
    args = client_argv(target, 0)
    url = option(args, "--server-url") or ""
    svc = one(target, "Service", "fl-server")
    (port,) = svc["spec"]["ports"]
    assert url == f"https://fl-server:{port['port']}", url
    assert selects(svc["spec"]["selector"], pod_labels(target, "fl-server"))
    env = {e["name"]: e for e in c["env"]}
    ca_file = env["FL_CA_FILE"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    spec = one(target, "StatefulSet", "fl-client")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mounts[str(Path(ca_file).parent)]]
    assert volume["secret"]["secretName"] == "fl-ca"
    assert [i["path"] for i in volume["secret"]["items"]] == [Path(ca_file).name], "clients get the CA, nothing else"
    daemon_sources = " ".join(p.read_text(encoding="utf-8") for p in (ROOT / "fl_client").rglob("*.py"))
    if "FL_CA_FILE" not in daemon_sources:
        pytest.skip("the daemon does not read FL_CA_FILE in this checkout yet (issue 18's TLS part)")


# ----------------------------------------------------------------------------- secrets
def readme_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic NAME --from-file=KEY=...` lines of the README."""
    text = (K8S / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.search(r"kubectl(?:\s+-n\s+\S+)?\s+create\s+secret\s+generic\s+([a-z0-9-]+)(.*)", line)
        if m:
            found.setdefault(m.group(1), set()).update(re.findall(r"--from-file=([\w.-]+)=", m.group(2)))
    return found


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_in_the_manifests_and_every_referenced_secret_is_documented(target: str) -> None:
    assert not objects(target, "Secret"), "Secrets are created by the operator (kubernetes/README.md), never rendered"
    referenced: dict[str, set[str]] = {}
    for w in workloads(target):
        spec = w["spec"]["template"]["spec"]
        for c in containers(spec):
            for e in c.get("env", []):
                if any(word in e["name"].upper() for word in SECRET_WORDS):
                    assert "value" not in e, f"{w['metadata']['name']}/{c['name']}: {e['name']} has a literal value"
                    ref = e["valueFrom"]["secretKeyRef"]
                    referenced.setdefault(ref["name"], set()).add(ref["key"])
            assert not c.get("envFrom"), "name each secret key a container gets"
        for v in spec["volumes"]:
            if "secret" in v:
                referenced.setdefault(v["secret"]["secretName"], set()).update(i["key"] for i in v["secret"]["items"])
    for sm in objects(target, "ServiceMonitor"):
        for ep in sm["spec"]["endpoints"]:
            ref = ep["tlsConfig"]["ca"]["secret"]
            referenced.setdefault(ref["name"], set()).add(ref["key"])
    documented = readme_secrets()
    for name, keys in referenced.items():
        assert name in documented, f"Secret {name} is referenced but kubernetes/README.md does not say how to create it"
        assert keys <= documented[name], f"Secret {name}: keys {keys - documented[name]} are not created in the README"
    # no token-looking literal anywhere in the render (a pasted secret would be a long random word)
    for word in re.findall(r"[A-Za-z0-9_\-]{32,}", rendered_text(target)):
        assert not (re.search(r"[A-Z]", word) and re.search(r"[a-z]", word) and re.search(r"[0-9]", word)), \
            f"a secret-looking value is in the rendered manifests: {word[:6]}..."


def test_the_readme_creates_the_server_secrets_the_cli_reads() -> None:
    from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
    from fl_server.rest.secrets import ENV_SERVER_SECRET

    c = container("base", "fl-server", "server")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert set(env) == {ENV_ENROLLMENT_TOKEN, ENV_ADMIN_TOKEN, ENV_SERVER_SECRET}
    assert readme_secrets()["fl-secrets"] == {ref["key"] for ref in env.values()}


# ----------------------------------------------------------------------------- network policies
@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_let_clients_reach_only_the_server(target: str) -> None:
    policies = objects(target, "NetworkPolicy")
    client, server = pod_labels(target, "fl-client"), pod_labels(target, "fl-server")
    port = int(option(server_argv(target), "--port") or 0)
    (cp,) = [p for p in policies if selects(p["spec"]["podSelector"], client)]
    (sp,) = [p for p in policies if selects(p["spec"]["podSelector"], server)]
    assert not selects(cp["spec"]["podSelector"], server) and not selects(sp["spec"]["podSelector"], client)
    # clients: no ingress at all; egress to the server's port and to DNS only
    assert set(cp["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not cp["spec"].get("ingress")
    egress = cp["spec"]["egress"]
    to_server = [r for r in egress if any("podSelector" in t and selects(t["podSelector"], server) for t in r["to"])]
    assert len(to_server) == 1 and [p["port"] for p in to_server[0]["ports"]] == [port]
    for rule in egress:
        assert rule.get("to"), "an egress rule without `to` allows every destination"
        if rule in to_server:
            continue
        for t in rule["to"]:
            assert t["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}, f"clients may reach only the server and DNS: {t}"
        assert {p["port"] for p in rule["ports"]} == {53}
    # the server: ingress on its port from the clients (and labelled namespaces), egress to DNS only
    assert set(sp["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = sp["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port]
    assert any("podSelector" in f and selects(f["podSelector"], client) for f in rule["from"])
    for r in sp["spec"]["egress"]:
        assert all(t["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"} for t in r["to"])


# ----------------------------------------------------------------------------- services, monitor, ingress
@pytest.mark.parametrize("target", TARGETS)
def test_services_select_pods_and_name_their_ports(target: str) -> None:
    for sts in objects(target, "StatefulSet"):
        governing = one(target, "Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None", "a StatefulSet's serviceName is a headless Service"
        assert selects(governing["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
        assert selects(sts["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    for svc in objects(target, "Service"):
        matched = [s for s in objects(target, "StatefulSet")
                   if selects(svc["spec"]["selector"], s["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, svc["metadata"]["name"]
        names = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"].get("ports", []):
            assert p["targetPort"] in names, (svc["metadata"]["name"], p)


@pytest.mark.parametrize("target", TARGETS)
def test_service_monitor_scrapes_the_server_once(target: str) -> None:
    for sm in objects(target, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(sm["spec"]) == {"selector", "endpoints"}
        services = [s for s in objects(target, "Service") if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        assert [s["metadata"]["name"] for s in services] == ["fl-server"], "one Service, or every sample is scraped twice"
        (ep,) = sm["spec"]["endpoints"]
        assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig"}, ep
        assert ep["port"] in {p["name"] for p in services[0]["spec"]["ports"]} and ep["path"] == "/metrics"
        assert ep["scheme"] == "https" and ep["tlsConfig"]["serverName"] == "fl-server"
    if target == "overlays/production":
        assert objects(target, "ServiceMonitor"), "production runs with the Prometheus Operator"


@pytest.mark.parametrize("target", TARGETS)
def test_ingress_routes_to_the_server_over_tls(target: str) -> None:
    for ing in objects(target, "Ingress"):
        (rule,) = ing["spec"]["rules"]
        (tls,) = ing["spec"]["tls"]
        assert rule["host"] in tls["hosts"] and tls["secretName"]
        backend = rule["http"]["paths"][0]["backend"]["service"]
        svc = one(target, "Service", backend["name"])
        assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
        ann = ing["metadata"]["annotations"]
        assert ann["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
        body = ann["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert int(body.rstrip("m")) * 2**20 >= server_config(target).max_update_bytes, \
            "the Ingress must pass any update the server accepts"


# ----------------------------------------------------------------------------- the ConfigMap mirrors docker/
def test_configmap_mirrors_the_compose_server_config() -> None:
    assert (K8S / "base" / "server.yaml").read_text(encoding="utf-8") == (ROOT / "docker" / "server.yaml").read_text(encoding="utf-8"), \
        "kubernetes/base/server.yaml must equal docker/server.yaml (cp docker/server.yaml kubernetes/base/server.yaml)"


def test_readme_commands_name_real_paths() -> None:
    text = (K8S / "README.md").read_text(encoding="utf-8")
    for path in set(re.findall(r"kubernetes/(?:overlays|components)/[\w-]+", text)):
        assert (ROOT / path).is_dir(), path
    for target in OVERLAYS:
        assert f"kubectl apply -k kubernetes/{target}" in text, f"the README does not say how to apply {target}"


def test_the_readme_secret_commands_make_the_secrets_the_pods_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Section 2 of the README run as written, with `kubectl` answering offline (`create secret ... --dry-run=client`)."""
    from fl_server.rest.secrets import ServerSecrets

    text = (K8S / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "create secret generic fl-secrets" in b]
    real = shutil.which("kubectl")
    out = tmp_path / "rendered.yaml"
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir()
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *"create namespace"*) exit 0 ;;
  *"create secret generic"*) "{real}" "$@" --dry-run=client -o yaml >> "{out}" && echo --- >> "{out}" ;;
  *) echo "the README runs an unexpected kubectl $*" >&2; exit 1 ;;
esac
""", encoding="utf-8")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "fl-secrets"
    assert folder.stat().st_mode & 0o077 == 0 and all(f.stat().st_mode & 0o077 == 0 for f in folder.iterdir()), \
        "the secret files must be readable by their owner only"
    (secret,) = [d for d in yaml.safe_load_all(out.read_text(encoding="utf-8")) if d]
    kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == ("fl-secrets", namespace_of("overlays/dev"))
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container("overlays/dev", "fl-server", "server")["env"]
            if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert set(values) == set(refs.values())
    # the server accepts them as they are (its own length rules), and uses them rather than generating its own
    for env_name, key in refs.items():
        monkeypatch.setenv(env_name, values[key])
    loaded = ServerSecrets.load(tmp_path / "state")
    assert loaded.enrollment_token == values["enrollment-token"] and loaded.admin_token == values["admin-token"]
    assert not (tmp_path / "state").exists()
