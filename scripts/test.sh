#!/usr/bin/env bash
# Configure (preset "default": Release, Ninja, build/), build and run every test. README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake --preset default
cmake --build --preset default --parallel "${KVSPARSE_JOBS:-2}"
ctest --preset default --output-on-failure
