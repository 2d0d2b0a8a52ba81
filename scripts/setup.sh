#!/usr/bin/env bash
# Installs moeserve and its test extras (pinned by scripts/test-constraints.txt) into the current Python environment.
# torch is installed first on its own so that an existing (or CPU) build is kept: the project does not cap it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    # CPU build where the machine offers one (pip's find-links); otherwise the registry's default build.
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
fi
# the test tools at the versions of scripts/test-constraints.txt (its header says how to move them), the
# optional Ray extra, whose executor the tests run on a local two-node Ray cluster, the cpu extra (Intel's
# OpenMP runtime, which the moeserve command preloads for CPU engines: moeserve/cpu_runtime.py), and the nixl
# extra, whose KV transfer between two instances tests/test_disagg.py runs over UCX on CPUs (its wheel asks for
# torch without a version: the build installed above satisfies it, nothing more is downloaded)
"$PY" -m pip install -q -c scripts/test-constraints.txt -e ".[test,ray,cpu,nixl]"
