#!/usr/bin/env bash
# The one command for the GPU host (../shared/device/README.md): unpack the carried
# dependencies (.devdeps/, when present), configure with CUDA into build-gpu/, build
# with -j16, run the cuda-labelled tests and print their summary, and with --bench run
# scripts/bench.sh gpu as well (further arguments go to bench.sh, e.g. --reps 5).
# Logs (configure, build, ctest, bench) and the benchmark results go under
# ${OUT:-gpu-logs}/. Safe to run again: it reuses build-gpu/ (or remakes it when it was
# configured from another source folder) and overwrites the logs.
# Exit status: the first failure of configure, build, tests, benchmarks (0 = all passed).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bench=0
bench_args=()
for a in "$@"; do
    case "$a" in
    --bench) bench=1 ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) bench_args+=("$a") ;;
    esac
done
[ "$bench" = 1 ] || [ ${#bench_args[@]} -eq 0 ] || { echo "gpu-check.sh: '${bench_args[*]}' only goes with --bench" >&2; exit 2; }

logs=${OUT:-gpu-logs}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)

if [ -f .devdeps/prelude.sh ]; then
    set +u # the prelude expands variables that may be unset
    # shellcheck disable=SC1091
    source .devdeps/prelude.sh
    set -u
fi
export NCCL_NVLS_ENABLE=0 # the host's rule: NVLink multicast stays off

{
    echo "date: $(date -Is)"
    echo "host: $(hostname)"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
    nvcc --version 2>&1 | tail -1 || echo "no nvcc"
} | tee "$logs/machine.txt"

# A build folder configured from another checkout path cannot be reused by cmake.
if [ -f build-gpu/CMakeCache.txt ] &&
    ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$root" build-gpu/CMakeCache.txt; then
    echo "gpu-check.sh: build-gpu/ was configured from another folder; starting it afresh" >&2
    rm -rf build-gpu
fi

step() { # name command...: runs the command with its output in $logs/<name>.log
    local name=$1; shift
    echo "gpu-check.sh: $name: $*" >&2
    set +e
    "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    set -e
    [ $rc -eq 0 ] || { echo "gpu-check.sh: $name failed (exit $rc); the end of $logs/$name.log:" >&2; tail -40 "$logs/$name.log" >&2; }
    return $rc
}

rc=0
step configure cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release || exit $?
step build cmake --build build-gpu -j16 || exit $?

set +e
(cd build-gpu && ctest -L cuda --output-on-failure --no-tests=error) >"$logs/ctest.log" 2>&1
test_rc=$?
set -e
echo "== ctest -L cuda (full log: $logs/ctest.log)"
# The summary: the per-test result lines and ctest's closing block.
grep -E '^ *[0-9]+/[0-9]+ Test +#' "$logs/ctest.log" || true
if grep -q 'tests passed' "$logs/ctest.log"; then
    sed -n '/tests passed/,$p' "$logs/ctest.log"
else
    tail -5 "$logs/ctest.log"
fi
[ $test_rc -eq 0 ] || rc=$test_rc

if [ "$bench" = 1 ]; then
    echo "== scripts/bench.sh gpu ${bench_args[*]:-}"
    set +e
    MOE_BIN=build-gpu/moe BENCH_OUT="$logs/bench" scripts/bench.sh gpu "${bench_args[@]}" 2>"$logs/bench.log" |
        tee "$logs/bench.md"
    bench_rc=${PIPESTATUS[0]}
    set -e
    [ "$bench_rc" -eq 0 ] || { echo "gpu-check.sh: bench.sh failed (exit $bench_rc; see $logs/bench.log)" >&2; [ $rc -ne 0 ] || rc=$bench_rc; }
fi
exit "$rc"
