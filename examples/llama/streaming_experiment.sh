#!/usr/bin/env bash
# The StreamingLLM experiment on llama2.c's stories260K (docs/streaming.md), from the source root:
#
#   examples/llama/streaming_experiment.sh [BUILD_DIR [OUT_DIR]]
#
# Builds kvsparse-llama and kvsparse-eval in BUILD_DIR (default build, configured Release with Ninja if
# it is not configured yet), then writes into OUT_DIR (default BUILD_DIR/streaming):
#   gates.tsv               LServe's gate values, calibrated on tinystories_sample.txt (512 tokens, sink 4,
#                           local 124): a text disjoint from both evaluated ones, and within the model's
#                           trained context, where its attention patterns are the ones it learnt
#   <text>.json/.csv/.txt   stream-ppl of 4096 tokens: every policy's default specs at budgets 64, 128 and
#                           256 (dense, window, sink 4 + window with absolute and in-cache positions, and
#                           every policy the spec table holds: H2O, Quest, LServe with gates.tsv), the sink
#                           sweep 0/1/2/8 in both position modes, attention mass on positions 0..3
#   speed.json/.txt         tokens/s of sink + window against recompute at budgets 64..1024, one run on
#                           one thread, the last 256 of 4096 tokens scored
#   trace_<text>/           dump-trace of 2048 tokens (meta.json alpha from gates.tsv); eval_<text>_<B>.json/.txt:
#                           kvsparse-eval at B
#   streaming.png, report.md  the figure and the tables (streaming_report.py)
# Environment: DATA (default ../shared/data beside the source tree), THREADS (default: all cores),
# PYTHON (default /usr/bin/python3, with Debian's python3-matplotlib).
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$src/build}
out=${2:-$build/streaming}
data=${DATA:-$src/../shared/data}
threads=${THREADS:-$(nproc)}
python=${PYTHON:-/usr/bin/python3}
budgets=(64 128 256)
speed_budgets=(64 128 256 512 1024)

SECONDS=0
if [[ ! -f $build/CMakeCache.txt ]]; then
  cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$build" --target kvsparse-llama kvsparse-eval >/dev/null
llama=$build/examples/kvsparse-llama
eval=$build/examples/kvsparse-eval
model=(--model "$data/stories260K.bin" --tokenizer "$data/tok512.bin")
mkdir -p "$out"

# 0. LServe's gate values: the model ships none, so measure them on a dense run of a text disjoint from
#    the evaluated ones (tinystories_sample.txt is not part of tinystories_160k.txt), within the trained
#    context of 512 tokens, at the middle budget's streaming-head shape (sink 4 + local 124).
echo "[$SECONDS s] calibrate-gates" >&2
"$llama" calibrate-gates "${model[@]}" --text "$data/tinystories_sample.txt" --tokens 512 --sink 4 --local 124 \
  --out "$out/gates.tsv" >"$out/gates.txt"

# 1. Quality: per-token loss of 4096 tokens of each text under every policy.
for text in tinystories_160k pride_and_prejudice; do
  args=()
  for b in "${budgets[@]}"; do
    args+=(--budget "$b")
    for s in 0 1 2 8; do
      args+=(--policy "sink:sinks=$s,window=$((b - s)),positions=in_cache")
      if (( s > 0 )); then args+=(--policy "sink:sinks=$s,window=$((b - s))"); fi
    done
  done
  echo "[$SECONDS s] stream-ppl $text on $threads threads" >&2
  "$llama" stream-ppl "${model[@]}" --text "$data/$text.txt" --tokens 4096 --threads "$threads" --mass 4 \
    --gates "$out/gates.tsv" "${args[@]}" --json "$out/$text.json" --csv "$out/$text.csv" >"$out/$text.txt"
done

# 2. Speed: sink + window (in-cache positions) against the sliding window with re-computation, in one
#    run on one thread so that the timings compare.
args=()
for b in "${speed_budgets[@]}"; do
  args+=(--policy "sink:sinks=4,window=$((b - 4)),positions=in_cache" --policy "recompute:window=$b")
done
echo "[$SECONDS s] stream-ppl speed, one thread" >&2
"$llama" stream-ppl "${model[@]}" --text "$data/tinystories_160k.txt" --tokens 4096 --last 256 --threads 1 \
  "${args[@]}" --json "$out/speed.json" >"$out/speed.txt"

# 3. Real attention replayed: dense traces of 2048 tokens through kvsparse-eval's default comparison.
for text in tinystories_160k pride_and_prejudice; do
  echo "[$SECONDS s] dump-trace $text" >&2
  "$llama" dump-trace "${model[@]}" --text "$data/$text.txt" --tokens 2048 --gates "$out/gates.tsv" \
    --out "$out/trace_$text" >/dev/null
  for b in "${budgets[@]}"; do
    echo "[$SECONDS s] kvsparse-eval $text, budget $b" >&2
    "$eval" --trace "$out/trace_$text" --budget "$b" --threads "$threads" --json "$out/eval_${text}_$b.json" \
      >"$out/eval_${text}_$b.txt"
  done
done

# 4. Figure and tables.
echo "[$SECONDS s] report" >&2
"$python" "$src/examples/llama/streaming_report.py" "$out"
echo "[$SECONDS s] done: $out/report.md, $out/streaming.png" >&2
