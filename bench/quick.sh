#!/usr/bin/env bash
# Reduced kvsparse-bench sweep for quick checks: the copy reference, 4 KiB pages read in order and
# shuffled, a decode step of every policy at 4K and 32K tokens, Quest and dense at 32K in turns (their
# steps, and their bytes read alone), append and the H2O update at 32K, then the suite's two CPU goals.
# The sweep runs in under two minutes once the binary is built. Run from anywhere:
#
#     bench/quick.sh [results.json]
#
# Build directory: build-bench (configured with the `bench` preset if it does not exist yet).
# Results: build-bench/quick.json unless a path is given. Extra Google Benchmark flags go in
# $KVSPARSE_BENCH_FLAGS. Exit status: non-zero if the build or the run failed, or a goal was missed.
set -euo pipefail

cd "$(dirname "$0")/.."
build=build-bench
out=${1:-$build/quick.json}
if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake --preset bench >/dev/null
fi
cmake --build "$build" --target kvsparse-bench >/dev/null
mkdir -p "$(dirname "$out")"

SECONDS=0
# shellcheck disable=SC2086
"$build/bench/kvsparse-bench" \
    --benchmark_filter='^(Copy/268435456|Read/4096|Decode/[a-z0-9_]+/(4096|32768)|Paired/(dense|quest)/32768|Reads/quest/32768|Append/[a-z0-9_]+/32768|H2OUpdate/32768)$' \
    --benchmark_min_time=0.05 --benchmark_out="$out" --benchmark_out_format=json ${KVSPARSE_BENCH_FLAGS:-}
echo "sweep: ${SECONDS} s, results in $out"
"${PYTHON:-python3}" bench/plot.py "$out" --check
