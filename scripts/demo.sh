#!/usr/bin/env bash
# Build (preset "default") and run the main job: kvsparse-eval on its embedded synthetic trace.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake --preset default
cmake --build --preset default --parallel "${KVSPARSE_JOBS:-2}" --target kvsparse-eval
./build/examples/kvsparse-eval "$@"
