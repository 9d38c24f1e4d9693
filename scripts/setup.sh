#!/usr/bin/env bash
# Installs everything the project, its main job and its tests need, on a fresh Debian/Ubuntu
# machine with Python 3.10+: the Fashion-MNIST files and chromium (Debian packages), PyTorch, and
# this package with its test extras (Playwright among them).
# Safe to run again: every step is skipped or a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: no apt-get here; put Fashion-MNIST's idx files in a folder and pass --data-dir" >&2
  fi
fi

# Debian's chromium for the dashboard's browser test (Playwright drives it; no browser download).
if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null; then
    echo "setup: installing Debian package chromium (browser test of the dashboard)" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: no apt-get here; install chromium for the dashboard's browser test (it is skipped without it)" >&2
  fi
fi

# Debian's kubectl (kustomize built in) renders kubernetes/ in tests/deploy/test_kubernetes.py, and Debian's
# prometheus scrapes a live server in tests/deploy/test_monitoring_live.py; both run offline. Each test is
# skipped with the reason where its package is missing.
for pkg in kubectl prometheus; do
  if ! command -v "$pkg" >/dev/null; then
    if command -v apt-get >/dev/null; then
      echo "setup: installing Debian package $pkg (deployment tests)" >&2
      (as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$pkg" >/dev/null) \
        || echo "setup: $pkg could not be installed; the tests that need it are skipped" >&2
    else
      echo "setup: no apt-get here; install $pkg for the deployment tests (they are skipped without it)" >&2
    fi
  fi
done

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch and torchvision" >&2
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi

echo "setup: installing federated-learning-hub (editable, with test extras)" >&2
"$PY" -m pip install -q -e ".[test]"
