#!/usr/bin/env bash
# Build (preset "default") and run the main program: the quick start from the README.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake --preset default
cmake --build --preset default --parallel "${KVSPARSE_JOBS:-2}" --target kvsparse-quick-start
./build/examples/kvsparse-quick-start
