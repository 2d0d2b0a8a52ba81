#!/usr/bin/env bash
# Installs moeserve and its test extras into the current Python environment.
# torch is installed first on its own so that an existing (or CPU) build is kept: the project does not cap it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    # CPU build where the machine offers one (pip's find-links); otherwise the registry's default build.
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
fi
"$PY" -m pip install -q -e ".[test]"
# redis-server: the shared KV store the store tests start on free ports (they skip, saying why, without it)
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get -o DPkg::Lock::Timeout=600 install -y -q redis-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                 && apt-get -o DPkg::Lock::Timeout=600 install -y -q redis-server >/dev/null 2>&1; }) \
            || echo "setup: could not install redis-server; the KV store tests will skip" >&2
    else
        echo "setup: redis-server missing and not root; the KV store tests will skip" >&2
    fi
fi
# System packages some tests use (they skip, saying why, where these are missing): a real Prometheus
# (promtool checks deploy/'s rules) and a headless Chromium with its WebDriver for the dashboard.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
        prometheus chromium chromium-driver
else
    echo "setup.sh: not root (or no apt-get): prometheus, chromium and chromium-driver not installed;" \
         "the tests that need them will skip" >&2
fi
