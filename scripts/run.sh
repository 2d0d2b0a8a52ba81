#!/usr/bin/env bash
# One command: set up and run the main job -- generate with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- "def fib(n):"; fi
exec moeserve generate "$@"
