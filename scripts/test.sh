#!/usr/bin/env bash
# One command: set up and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/test_services.sh
"${PYTHON:-python3}" -m ruff check moeserve tests benchmarks scripts
"${PYTHON:-python3}" -m mypy
# the 25 slowest tests in the log: the suite is to stay well under CI's 30 minutes
exec "${PYTHON:-python3}" -m pytest -q -ra --durations=25 "$@"
