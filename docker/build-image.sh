#!/usr/bin/env bash
# Builds the Federated Learning Hub image with no image registry and no PyPI at build time, and tags it
# federated-learning-hub:latest: the image docker-compose.yml runs (FL_IMAGE overrides that).
#
#   1. a Debian base image made locally with debootstrap (bookworm, minbase, python3 + venv + pip) and
#      `docker import`ed as fl-base:local (reused when it exists; making it needs root);
#   2. a wheel folder (the torch CPU wheel, the project's requirements read from pyproject.toml, the build
#      backend) made with `pip download` from whatever this host's pip is configured with, for the base
#      image's CPython and four manylinux/linux platform tags (one tag alone misses some wheels, e.g.
#      zstandard's); cached and reused;
#   3. `docker build -f docker/Dockerfile` with BASE_IMAGE=fl-base:local and WHEELS=wheels, in a small
#      temporary build context (the sources, docker/ and hard links to the wheels).
#
# docker/smoke-test.sh builds through this script too, so the documented route is the tested one.
#
# Usage: docker/build-image.sh [--tag IMAGE] [--network MODE] [--dry-run]
#   --tag IMAGE      what to build (default federated-learning-hub:latest)
#   --network MODE   `docker build --network MODE`. Default: `host` when the daemon has no `bridge`
#                    network (dockerd started with --bridge=none), else Docker's default.
#   --dry-run        print the pip download and docker build commands and exit; needs no Docker, no root
#                    (the base image's Python is then taken as FL_BUILD_PYTHON, default 3.11 = bookworm's)
# Environment (all optional):
#   FL_BUILD_WORK=/var/tmp/fl-build      cache (wheels/) and temporary folders
#   FL_BUILD_WHEELS=DIR                  use this ready wheel folder instead of `pip download`
#   FL_BUILD_TORCH=torch==2.13.0+cpu     torch requirement (no torchvision: see docker/Dockerfile)
#   FL_BUILD_EXTRA_PACKAGES=""           more requirements (build arg EXTRA_PACKAGES), e.g. "opacus"
#   FL_BUILD_MIRROR=http://deb.debian.org/debian   FL_BUILD_SUITE=bookworm   (debootstrap)
#   FL_BUILD_REBUILD_BASE=1              debootstrap again even if fl-base:local exists
# Everything heavy runs under `nice -n 19`.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=federated-learning-hub:latest
NETWORK=""
DRY_RUN=0
while (( $# )); do
    case "$1" in
        --tag) IMAGE=${2:?--tag needs an image name}; shift 2 ;;
        --tag=*) IMAGE=${1#--tag=}; shift ;;
        --network) NETWORK=${2:?--network needs a mode}; shift 2 ;;
        --network=*) NETWORK=${1#--network=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) printf 'build-image: unknown argument %q (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done
WORK=${FL_BUILD_WORK:-/var/tmp/fl-build}
BASE_TAG=fl-base:local
TORCH_SPEC=${FL_BUILD_TORCH:-torch==2.13.0+cpu}
EXTRA=${FL_BUILD_EXTRA_PACKAGES:-}
MIRROR=${FL_BUILD_MIRROR:-http://deb.debian.org/debian}
SUITE=${FL_BUILD_SUITE:-bookworm}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 linux_x86_64)
NICE=(nice -n 19)

log() { printf '\n=== %s  %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'build-image: FAILED: %s\n' "$*" >&2; exit 1; }
show() { printf '%q ' "$@"; printf '\n'; }

# The project's requirements, torch and torchvision left out (installed from TORCH_SPEC, or not at all).
requirements() {
    python3 - "$REPO/pyproject.toml" <<'PY'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11 on the host
    import tomli as tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for d in deps:
    if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() not in ("torch", "torchvision"):
        print(d)
PY
}
mapfile -t REQS < <(requirements)
(( ${#REQS[@]} )) || die "no requirements read from pyproject.toml"

# The two commands, as arrays (printed by --dry-run, run otherwise).
pip_download_cmd() {  # $1 = destination, $2 = the base image's python version -> PIP_CMD
    local p
    PIP_CMD=(python3 -m pip download --quiet --dest "$1" --only-binary=:all: --python-version "$2" --implementation cp)
    for p in "${PLATFORMS[@]}"; do PIP_CMD+=(--platform "$p"); done
    # shellcheck disable=SC2206  # EXTRA is a space-separated list of requirements
    PIP_CMD+=("$TORCH_SPEC" "${REQS[@]}" $EXTRA "setuptools>=68" wheel)
}
docker_build_cmd() {  # $1 = build context -> BUILD_CMD
    BUILD_CMD=(docker build -f "$1/docker/Dockerfile" -t "$IMAGE")
    [[ -n "$NETWORK" ]] && BUILD_CMD+=(--network "$NETWORK")
    BUILD_CMD+=(--build-arg BASE_IMAGE="$BASE_TAG" --build-arg WHEELS=wheels --build-arg TORCH_PACKAGES="$TORCH_SPEC"
                --build-arg EXTRA_PACKAGES="$EXTRA" "$1")
}

if (( DRY_RUN )); then
    pip_download_cmd "${FL_BUILD_WHEELS:-$WORK/wheels}" "${FL_BUILD_PYTHON:-3.11}"
    docker_build_cmd "$WORK/context"
    show "${PIP_CMD[@]}"
    show "${BUILD_CMD[@]}"
    exit 0
fi

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon (is dockerd running? see docker/README.md)"
# The classic builder when the CLI has no buildx (a Docker 23+ CLI refuses to build otherwise).
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
# A daemon started with --bridge=none has no default network to build in: use the host's.
if [[ -z "$NETWORK" ]] && ! docker network inspect bridge >/dev/null 2>&1; then
    NETWORK=host
    echo "build-image: the daemon has no bridge network; building with --network host"
fi

mkdir -p "$WORK"
TMP=$(mktemp -d "$WORK/build.XXXXXX")
ROOTFS=""
cleanup() {
    local rc=$?
    set +e
    [[ -n "$ROOTFS" && -d "$ROOTFS" ]] && rm -rf --one-file-system "$ROOTFS"
    rm -rf "$TMP"
    (( rc == 0 )) || echo "build-image: FAILED (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------------------- 1. base image
if [[ "${FL_BUILD_REBUILD_BASE:-0}" != 1 ]] && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "base image $BASE_TAG exists; reusing it (FL_BUILD_REBUILD_BASE=1 makes it again)"
else
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    (( EUID == 0 )) || die "debootstrap needs root to make $BASE_TAG"
    ROOTFS="$TMP/rootfs"
    log "debootstrap $SUITE (minbase + python3, python3-venv, python3-pip) from $MIRROR"
    start=$SECONDS
    "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
        "$SUITE" "$ROOTFS" "$MIRROR" > "$TMP/debootstrap.log" 2>&1 \
        || { tail -20 "$TMP/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*
    tar -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
    rm -rf --one-file-system "$ROOTFS"; ROOTFS=""
    log "made $BASE_TAG in $((SECONDS - start)) s"
fi
BASE_PY=$(docker run --rm "$BASE_TAG" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
echo "base image $BASE_TAG: python $BASE_PY"

# ----------------------------------------------------------------------------- 2. wheel folder
if [[ -n "${FL_BUILD_WHEELS:-}" ]]; then
    WHEELS_SRC=$FL_BUILD_WHEELS
    log "using the wheel folder $WHEELS_SRC"
else
    WHEELS_SRC="$WORK/wheels"
    log "wheel folder $WHEELS_SRC for CPython $BASE_PY ($TORCH_SPEC + requirements + build backend)"
    mkdir -p "$WHEELS_SRC"
    pip_download_cmd "$WHEELS_SRC" "$BASE_PY"
    "${NICE[@]}" "${PIP_CMD[@]}" > "$TMP/pip-download.log" 2>&1 \
        || { grep -v "is ignored: it is neither" "$TMP/pip-download.log" | tail -20 >&2
             die "pip download failed: is '$TORCH_SPEC' reachable from this host's pip (pip config list)?"; }
fi
ls "$WHEELS_SRC"/torch-*.whl >/dev/null 2>&1 || die "no torch wheel in $WHEELS_SRC"
echo "$(ls "$WHEELS_SRC" | wc -l) wheels, $(du -sh "$WHEELS_SRC" | cut -f1): $(cd "$WHEELS_SRC" && ls torch-*.whl)"

# ----------------------------------------------------------------------------- 3. image
# A small build context: what docker/Dockerfile copies, plus the wheels (hard links, no copy).
CTX="$TMP/context"
mkdir -p "$CTX"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -c pyproject.toml README.md fl_common fl_server fl_client docker \
    | tar -C "$CTX" -x
cp -al "$WHEELS_SRC" "$CTX/wheels" 2>/dev/null || cp -a "$WHEELS_SRC" "$CTX/wheels"
docker_build_cmd "$CTX"
log "docker build $IMAGE (BASE_IMAGE=$BASE_TAG, WHEELS=wheels, TORCH_PACKAGES=$TORCH_SPEC${EXTRA:+, EXTRA_PACKAGES=$EXTRA}${NETWORK:+, network $NETWORK})"
OLD_ID=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
start=$SECONDS
"${NICE[@]}" "${BUILD_CMD[@]}" > "$TMP/build.log" 2>&1 || { tail -40 "$TMP/build.log" >&2; die "docker build failed (log above)"; }
NEW_ID=$(docker image inspect -f '{{.Id}}' "$IMAGE")
# The image this build replaced (untagged now); builder-stage images stay: they are the layer cache.
[[ -n "$OLD_ID" && "$OLD_ID" != "$NEW_ID" ]] && { docker image rm "$OLD_ID" >/dev/null 2>&1 || true; }
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "built $IMAGE in $((SECONDS - start)) s; image size $((SIZE / 1000000)) MB"
