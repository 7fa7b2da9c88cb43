#!/usr/bin/env bash
# The full kvsparse-bench sweep behind docs/benchmarks.md, then its figure and tables. One process for the
# copy, the page reads (Read/), dense decode (and its steps in turns with the copy), append and the H2O
# update, and one per sparse policy with dense decode (and the policy's Paired/ steps, dense and the
# policy in turns, and for Quest Reads/, their bytes read alone) in the same process, so that every
# speedup is a ratio of two results of one run. Run from anywhere:
#
#     bench/sweep.sh [results-dir]        (default: docs/bench-results)
#
# Build directory: build-bench (configured with the `bench` preset if it does not exist yet). Writes
# <results-dir>/<run>.json, docs/benchmarks.png, and prints the tables and the goals (python3 with numpy
# and matplotlib: Debian's python3-matplotlib; $PYTHON names another interpreter). Extra Google Benchmark
# flags go in $KVSPARSE_BENCH_FLAGS.
# On a shared machine start it (or each run) when the machine is otherwise idle: the times are wall times.
set -euo pipefail

cd "$(dirname "$0")/.."
build=build-bench
out=${1:-docs/bench-results}
if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake --preset bench >/dev/null
fi
cmake --build "$build" --target kvsparse-bench >/dev/null
mkdir -p "$out"
bin=$build/bench/kvsparse-bench

run() {  # name filter
    # shellcheck disable=SC2086
    "$bin" --benchmark_filter="$2" --benchmark_out="$out/$1.json" --benchmark_out_format=json ${KVSPARSE_BENCH_FLAGS:-}
}
run base '^(Copy/.*|Read/.*|Decode/dense/.*|Paired/dense/.*|Append/.*|H2OUpdate/.*)$'
policies=$("$bin" --benchmark_list_tests | sed -n 's|^Decode/\([a-z0-9_]*\)/.*|\1|p' | grep -v '^dense$' | uniq)
files=("$out/base.json")
for p in $policies; do
    run "$p" "^(Decode/(dense|$p)/.*|Paired/$p/.*|Reads/$p/.*)\$"
    files+=("$out/$p.json")
done
"${PYTHON:-python3}" bench/plot.py "${files[@]}" --figure docs/benchmarks.png --markdown --check
