#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: configure, build the CUDA tests and the GPU benchmark, run both (the
# tests also under compute-sanitizer's memcheck, where it is installed), and write everything to one
# results file. Run from the repository root:
#
#     bench/gpu.sh              # build in build-gpu, then run
#     bench/gpu.sh --prebuilt   # run build-gpu/tests/test_cuda and build-gpu/bench/gpu_bench as they are
#
# --prebuilt is for a GPU machine without Catch2: build the two targets elsewhere (same configure line as
# below) and copy them into build-gpu/tests and build-gpu/bench.
# Results: build-gpu/gpu-results.txt, or the path in $KVSPARSE_GPU_RESULTS.
# To profile the attention kernel (Nsight Compute, where the machine's runtime gives it the counters):
#     ncu --clock-control none --kernel-name regex:attend_chunk --launch-skip 2 --launch-count 1 \
#         --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
#         build-gpu/bench/gpu_bench --profile-attend
# Exit status: non-zero if the configure, the build, a CUDA test, memcheck or the benchmark failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
build=build-gpu
results=${KVSPARSE_GPU_RESULTS:-$build/gpu-results.txt}
jobs=$(nproc 2>/dev/null || echo 4)
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi

mkdir -p "$build" "$(dirname "$results")"
: >"$results"
log() { printf '%s\n' "$*" | tee -a "$results"; }
run() {  # run a command, its output into the results too; returns its status
    log "\$ $*"
    "$@" 2>&1 | tee -a "$results"
    return "${PIPESTATUS[0]}"
}

log "kvsparse GPU run, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
    run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
fi

status=0
SECONDS=0
if [[ ${1-} == --prebuilt ]]; then
    log "prebuilt binaries: $build/tests/test_cuda, $build/bench/gpu_bench"
else
    # Only sm_90 code is needed for an H200, but the targets build sm_80 and sm_90 as in CI.
    if ! run cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DKVSPARSE_CUDA=ON \
            -DKVSPARSE_BUILD_TESTS=ON -DKVSPARSE_BUILD_BENCHMARKS=ON -DKVSPARSE_BUILD_EXAMPLES=OFF; then
        log "configure failed"
        exit 1
    fi
    if ! grep -q '^CMAKE_CUDA_COMPILER:[A-Z]*=.*nvcc' "$build/CMakeCache.txt"; then
        log "no CUDA compiler found by CMake (is nvcc on PATH or CUDACXX set?)"
        exit 1
    fi
    if ! run cmake --build "$build" --target test_cuda gpu_bench -j "$jobs"; then
        log "build failed"
        exit 1
    fi
    log "configure + build: ${SECONDS} s"
fi

log ""
log "== CUDA tests (CudaBackend against CpuBackend) =="
SECONDS=0
run "$build/tests/test_cuda" || status=1
# A skip here means the tests found no device: that is a failure on a GPU machine.
if grep -q 'no CUDA device: skipped' "$results"; then
    log "CUDA tests were skipped: no usable CUDA device"
    status=1
fi
log "tests: ${SECONDS} s"

log ""
log "== CUDA primitive timings =="
SECONDS=0
run "$build/bench/gpu_bench" || status=1
log "benchmark: ${SECONDS} s"

if command -v compute-sanitizer >/dev/null 2>&1; then
    log ""
    log "== CUDA tests under compute-sanitizer memcheck =="
    SECONDS=0
    run timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 "$build/tests/test_cuda" '~[launch-failure]' || status=1
    log "memcheck: ${SECONDS} s"
fi

log ""
log "results: $results (status $status)"
exit "$status"
