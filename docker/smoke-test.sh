#!/usr/bin/env bash
# Smoke test of the container deployment, with no image registry and no PyPI at build time:
#
#   1. docker/build-image.sh --tag federated-learning-hub:smoke: the documented build without a registry
#      (a debootstrap base image fl-base:local and a local wheel folder, both reused when present);
#   2. docker-compose.yml brought up as it is (TLS included: tls-init, https, clients verifying the CA) with
#      3 clients for 2 rounds (FL_SERVER_ARGS: num_clients=3, num_rounds=2, a 6000-sample training subset),
#      /status polled over https with the CA from the fl-ca volume until `finished`, what happened printed,
#      and everything torn down (trap), volumes included.
#
# Usage: docker/smoke-test.sh [--clean]      (run as root, or as a user allowed to use docker;
#                                            debootstrap needs root when the base image is missing)
#   --clean   also remove the images (base, smoke image, builder-stage cache) and the wheel cache
#             afterwards (the next run starts from scratch)
# Environment (all optional): the FL_BUILD_* variables of docker/build-image.sh (wheel cache, torch
# requirement, Debian mirror, ...), and
#   FL_SMOKE_TIMEOUT=1800              seconds to wait for the 2 rounds
#   FL_SMOKE_NETWORK=host              docker build --network (default: build-image.sh's choice)
#
# Idempotent: leftovers of an interrupted run (compose project "flsmoke", its volumes) are removed
# first; the base image and the wheel cache are reused. CPU: everything started from here runs
# under `nice -n 19`, and the containers' processes are reniced to 19 once they are up.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${FL_BUILD_WORK:-/var/tmp/fl-build}
IMAGE=federated-learning-hub:smoke
PROJECT=flsmoke
CLIENTS=3
ROUNDS=2
TIMEOUT=${FL_SMOKE_TIMEOUT:-1800}
CLEAN=0
[[ "${1:-}" == "--clean" ]] && CLEAN=1
NICE=(nice -n 19)

log() { printf '\n=== %s  %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'smoke-test: FAILED: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon (is dockerd running? see docker/README.md)"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else die "neither 'docker compose' nor 'docker-compose' is installed"; fi

mkdir -p "$WORK"
TMP=$(mktemp -d "$WORK/smoke.XXXXXX")
DC=("${COMPOSE[@]}" -p "$PROJECT" -f "$REPO/docker-compose.yml")

# Secrets for this run only: random, exported to compose, never printed or written to the repo.
rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
FL_ENROLLMENT_TOKEN=$(rand) FL_ADMIN_TOKEN=$(rand) FL_SERVER_SECRET=$(rand)
export FL_ENROLLMENT_TOKEN FL_ADMIN_TOKEN FL_SERVER_SECRET
export FL_IMAGE=$IMAGE FL_SERVER_BIND=127.0.0.1
export FL_SERVER_ARGS="--set num_clients=$CLIENTS --set num_rounds=$ROUNDS --set max_train_samples=6000 --set max_test_samples=2000"
FL_SERVER_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export FL_SERVER_PORT

cleanup() {
    local rc=$?
    set +e
    log "teardown"
    "${DC[@]}" down --volumes --remove-orphans --timeout 20 >/dev/null 2>&1
    rm -rf "$TMP"
    if (( CLEAN )); then
        docker image rm -f "$IMAGE" fl-base:local >/dev/null 2>&1
        docker image prune -f --filter label=io.github.federated-learning-hub.builder=1 >/dev/null 2>&1
        rm -rf "$WORK/wheels"
        rmdir "$WORK" 2>/dev/null
    fi
    (( rc == 0 )) && echo "smoke-test: PASSED" || echo "smoke-test: FAILED (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "removing leftovers of an earlier run (project $PROJECT)"
"${DC[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true

# ----------------------------------------------------------------------------- 1. image (the documented route)
start=$SECONDS
"$REPO/docker/build-image.sh" --tag "$IMAGE" ${FL_SMOKE_NETWORK:+--network "$FL_SMOKE_NETWORK"} \
    || die "docker/build-image.sh failed"
BUILD_S=$((SECONDS - start))
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")

# ----------------------------------------------------------------------------- 2. the stack
renice_project() {  # best effort: every thread of every process of the project's containers
    local c pid tid
    for c in $("${DC[@]}" ps -q 2>/dev/null); do
        for pid in $(docker top "$c" -eo pid 2>/dev/null | tail -n +2); do
            for tid in /proc/"$pid"/task/*; do renice -n 19 -p "${tid##*/}" >/dev/null 2>&1 || true; done
        done
    done
}

log "docker-compose up: server + $CLIENTS clients, $ROUNDS rounds (server on 127.0.0.1:$FL_SERVER_PORT)"
start=$SECONDS
if ! "${NICE[@]}" "${DC[@]}" up -d --no-build --scale client="$CLIENTS" 2>&1 | sed 's/^/  /'; then
    log "server log (last 40 lines)"
    "${DC[@]}" logs --no-color --tail 40 server 2>&1 | sed 's/^/  /'
    die "docker-compose up failed"
fi
renice_project

# /status over https, verified with the CA the server put in the fl-ca volume (fetched once it is there).
CA="$TMP/ca.pem"
fetch_ca() { [[ -s "$CA" ]] || "${DC[@]}" exec -T server cat /var/lib/fl-ca/ca.pem > "$CA" 2>/dev/null || rm -f "$CA"; [[ -s "$CA" ]]; }
status() { fetch_ca && python3 -c 'import json, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(sys.argv[1], timeout=5, context=ctx) as r: print(json.dumps(json.load(r)))' \
    "https://localhost:$FL_SERVER_PORT/status" "$CA" 2>/dev/null; }
field() { python3 -c 'import json, sys; s = json.loads(sys.argv[1]); a = s.get("accuracy")
print("state=%s rounds=%s/%s registered=%s online=%s accuracy=%s" % (s["state"], s["completed_rounds"], s["num_rounds"],
      s["clients"]["registered"], s["clients"]["online"], "-" if a is None else "%.4f" % a))' "$1"; }

last="" ; final=""
while :; do
    if s=$(status); then
        line=$(field "$s")
        [[ "$line" != "$last" ]] && echo "  [$((SECONDS - start)) s] $line" && last=$line
        if [[ "$line" == state=finished* ]]; then final=$s; break; fi
    fi
    (( SECONDS - start > TIMEOUT )) && break
    server_state=$(docker inspect -f '{{.State.Status}}' "$("${DC[@]}" ps -q server)" 2>/dev/null || echo gone)
    [[ "$server_state" == running ]] || { echo "  server container is $server_state"; break; }
    renice_project
    sleep 3
done
STACK_S=$((SECONDS - start))

log "containers"
"${DC[@]}" ps 2>&1 | sed 's/^/  /'
log "server log (last 25 lines)"
"${DC[@]}" logs --no-color --tail 25 server 2>&1 | sed 's/^/  /'
log "client logs (last 4 lines each)"
for c in $("${DC[@]}" ps -q client); do
    echo "  -- $(docker inspect -f '{{.Name}} exit={{.State.ExitCode}} status={{.State.Status}} restarts={{.RestartCount}}' "$c")"
    docker logs --tail 4 "$c" 2>&1 | sed 's/^/     /'
done

[[ -n "$final" ]] || die "the federation did not finish within ${TIMEOUT} s (last: ${last:-no answer from /status})"
log "final /status after ${STACK_S} s"
python3 -c 'import json, sys; s = json.loads(sys.argv[1]); print(json.dumps(s, indent=2))' "$final" | sed 's/^/  /'
python3 - "$final" "$ROUNDS" "$CLIENTS" <<'PY' || die "the final /status is not what 2 rounds with 3 clients give"
import json, sys
s, rounds, clients = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
assert s["state"] == "finished", s["state"]
assert s["completed_rounds"] == rounds, s["completed_rounds"]
assert s["clients"]["registered"] == clients, s["clients"]
assert s["accuracy"] is not None and s["accuracy"] > 0.1, s["accuracy"]
assert [int(r["clients"]) for r in s["history"]] == [clients] * rounds, s["history"]  # every client in every round
PY
echo "summary: image $IMAGE $((SIZE / 1000000)) MB built in ${BUILD_S} s (docker/build-image.sh), over https," \
     "$ROUNDS rounds with $CLIENTS clients in ${STACK_S} s"
