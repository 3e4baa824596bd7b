#!/usr/bin/env bash
# The one command for a GPU machine: unpack the dependencies that scripts/gpu-prepare.sh
# packed (.devdeps/ beside the tree, when present), configure with CUDA into build-gpu/, build
# with -j16, run the cuda-labelled tests and print their summary; then, as asked:
#   --bench    scripts/bench.sh gpu (further arguments go to bench.sh, e.g. --reps 5)
#   --ablate   the H200 ablations (scripts/ablate-*.sh gpu; ABLATE_KINDS default "routers
#              mixers", ABLATE_ARGS default "--seeds 2 --jobs 3", ABLATE_TIMEOUT bounds
#              them); several GPUs: one kind per GPU at once. With --bench on 2+ GPUs the
#              benchmarks take GPU 0 and half the cores, the ablations the rest, side by side
#   --bench-cpu  scripts/bench.sh cpu (the headline CPU comparison, pinned by bench.sh to
#              cores 0,1; BENCH_CPU_ARGS, default "--reps 5 --rounds 2") in the background
#              from the start, while the GPU work stays off cores 0,1 (--multi runs after it)
#   --racecheck  compute-sanitizer racecheck and memcheck of the kernels with shared-memory
#              barriers worth checking (tensor-core and variable-length attention, delta
#              scan, the sorted index_add): test_cuda_ops with MOE_TEST_OPS=attention,delta_scan
#              and test_cuda_ops_index (logs racecheck.log, memcheck.log, *-index.log)
#   --multi    with 2+ GPUs: NCCL collectives (tests/test_mpi_overlap, one rank per GPU),
#              N GPUs = 1 GPU in bf16 (scripts/test-mpi-train.sh --device cuda --dtype
#              bf16) and weak scaling (scripts/scale-gpu.sh)
# Logs and results go under gpu-logs/; when $OUT names a folder (where a remote run's
# results are collected) they are also packed into ONE file, $OUT/gpu-logs.tgz, with the
# reports beside it, so that a few files carry everything back. Safe to run again: it
# reuses build-gpu/ (or remakes it when it was configured from another source folder)
# and overwrites the logs.
# Exit status: the first failure of configure, build, tests, benchmarks, ablations,
# multi-GPU checks (0 = all passed).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bench=0 ablate=0 multi=0 bench_cpu=0 racecheck=0
bench_args=()
for a in "$@"; do
    case "$a" in
    --bench) bench=1 ;;
    --ablate) ablate=1 ;;
    --multi) multi=1 ;;
    --bench-cpu) bench_cpu=1 ;;
    --racecheck) racecheck=1 ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) bench_args+=("$a") ;;
    esac
done
[ "$bench" = 1 ] || [ ${#bench_args[@]} -eq 0 ] || { echo "gpu-check.sh: '${bench_args[*]}' only goes with --bench" >&2; exit 2; }

mkdir -p gpu-logs
logs=$(cd gpu-logs && pwd)
pack() { # the logs as one archive plus the reports, into $OUT
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/gpu-logs.tgz" -C "$logs" . 2>/dev/null || true
    for f in bench.md bench-cpu.md ablate-routers.md ablate-mixers.md profile-fine.txt; do [ -f "$logs/$f" ] && cp "$logs/$f" "$OUT/"; done
    return 0
}
trap pack EXIT

if [ -f .devdeps/prelude.sh ]; then
    set +u # the prelude expands variables that may be unset
    # shellcheck disable=SC1091
    source .devdeps/prelude.sh
    set -u
fi
export NCCL_NVLS_ENABLE=0 # NVLink multicast stays off on the GPU machines

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

if [ "$racecheck" = 1 ]; then
    # memcheck leaves out CUDA API errors: test_cuda_ops's out-of-memory case asks for
    # 1 PiB on purpose; what is checked is every device memory access.
    for tool in racecheck memcheck; do
        step "$tool" timeout 400 env MOE_TEST_OPS=attention,delta_scan \
            compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 3 build-gpu/tests/test_cuda_ops ||
            { [ $rc -ne 0 ] || rc=1; }
        grep -E "ERROR SUMMARY|hazard|parity:" "$logs/$tool.log" | tail -3
        step "$tool-index" timeout 200 compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 3 \
            build-gpu/tests/test_cuda_ops_index || { [ $rc -ne 0 ] || rc=1; }
        grep -E "ERROR SUMMARY|hazard" "$logs/$tool-index.log" | tail -2
    done
fi

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
ncpu=$(nproc)
# With --bench and --ablate on 2+ GPUs the two run side by side: the benchmarks on GPU 0
# and the first half of the cores, the ablations on the other GPUs and cores (so neither
# disturbs the other's timings); else one after the other on GPU 0.
side=0
[ "$bench" = 1 ] && [ "$ablate" = 1 ] && [ "$ngpu" -ge 2 ] && side=1
lo=0 # cores lo.. are the GPU work's (0,1 go to the CPU benchmark when it runs)
[ "$bench_cpu" = 1 ] && lo=2
cores() { # first|second: the GPU work's cores for the benchmarks / the ablations ("" = any)
    [ "$side" = 1 ] || [ "$lo" -gt 0 ] || return 0
    local n=$((ncpu - lo))
    if [ "$side" = 0 ]; then echo "$lo-$((ncpu - 1))"
    elif [ "$1" = first ]; then echo "$lo-$((lo + n / 2 - 1))"
    else echo "$((lo + n / 2))-$((ncpu - 1))"; fi
}
pinned() { # cores command...: the command on those cores (all when empty)
    local c=$1; shift
    if [ -n "$c" ] && command -v taskset >/dev/null; then taskset -c "$c" "$@"; else "$@"; fi
}

run_bench() { # the benchmarks, then a per-kernel profile of the fine-grained layer
    echo "== scripts/bench.sh gpu ${bench_args[*]:-}"
    set +e
    CUDA_VISIBLE_DEVICES=0 MOE_BIN=build-gpu/moe BENCH_OUT="$logs/bench" \
        pinned "$(cores first)" scripts/bench.sh gpu "${bench_args[@]}" 2>"$logs/bench.log" >"$logs/bench.md"
    local b=$?
    CUDA_VISIBLE_DEVICES=0 MOE_PROFILE=2 pinned "$(cores first)" build-gpu/moe bench moe-layer-gpu-fine \
        >"$logs/profile-fine.txt" 2>&1
    set -e
    echo "$b" >"$logs/bench.rc"
}

run_ablations() {
    # Each kind on its own GPU when there are enough (GPU 0 left to the benchmarks when
    # they run beside); ABLATE_KINDS (default "routers mixers"), ABLATE_ARGS (default
    # "--seeds 2 --jobs 3") for every kind; ABLATE_TIMEOUT (seconds, default none)
    # interrupts them: the tables then cover the runs that finished.
    read -r -a ablate_args <<<"${ABLATE_ARGS:---seeds 2 --jobs 3}"
    read -r -a kinds <<<"${ABLATE_KINDS:-routers mixers}"
    local first=$side free=$((ngpu > side ? ngpu - side : 1)) i=0 pids=() kind
    for kind in "${kinds[@]}"; do
        local gpu=$(( ngpu > 1 ? first + i % free : 0 )) lim=()
        [ -z "${ABLATE_TIMEOUT:-}" ] || lim=(timeout -s TERM "$ABLATE_TIMEOUT")
        echo "== scripts/ablate-$kind.sh gpu ${ablate_args[*]} (GPU $gpu)"
        (set +e; CUDA_VISIBLE_DEVICES=$gpu MOE_BIN=build-gpu/moe pinned "$(cores second)" "${lim[@]}" \
            scripts/ablate-$kind.sh gpu "${ablate_args[@]}" >"$logs/ablate-$kind.log" 2>&1
         echo $? >"$logs/ablate-$kind.rc") &
        pids+=($!)
        i=$((i + 1))
        [ "$free" -gt "$i" ] || [ "$i" -ge "${#kinds[@]}" ] || { wait "${pids[@]}"; pids=(); } # one per GPU at a time
    done
    wait "${pids[@]}" 2>/dev/null || true
}

report_ablations() {
    read -r -a kinds <<<"${ABLATE_KINDS:-routers mixers}"
    local kind a_rc
    for kind in "${kinds[@]}"; do
        a_rc=$(cat "$logs/ablate-$kind.rc" 2>/dev/null || echo 1)
        cp runs/ablate-$kind/results.md "$logs/ablate-$kind.md" 2>/dev/null && cat "$logs/ablate-$kind.md"
        mkdir -p "$logs/ablate-$kind"
        cp runs/ablate-$kind/*.png runs/ablate-$kind/setup.txt "$logs/ablate-$kind/" 2>/dev/null || true
        for d in runs/ablate-$kind/*/; do # each run's log and metrics (the checkpoints stay)
            [ -f "$d/train.log" ] && cp "$d/train.log" "$logs/ablate-$kind/$(basename "$d").log"
            [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$logs/ablate-$kind/$(basename "$d").jsonl"
        done
        [ "$a_rc" -eq 0 ] || { echo "gpu-check.sh: ablate-$kind failed (exit $a_rc)" >&2; [ $rc -ne 0 ] || rc=$a_rc; }
    done
}

if [ "$bench_cpu" = 1 ]; then
    read -r -a cpu_args <<<"${BENCH_CPU_ARGS:---reps 5 --rounds 2}"
    echo "== scripts/bench.sh cpu ${cpu_args[*]} (background, cores 0,1)"
    (set +e; MOE_BIN=build-gpu/moe BENCH_OUT="$logs/bench-cpu" scripts/bench.sh cpu "${cpu_args[@]}" \
        >"$logs/bench-cpu.md" 2>"$logs/bench-cpu.log"; echo $? >"$logs/bench-cpu.rc") &
    bench_cpu_pid=$!
fi
if [ "$side" = 1 ]; then
    run_bench &
    bench_pid=$!
    run_ablations
    wait "$bench_pid" || true
else
    [ "$bench" = 1 ] && run_bench
    [ "$ablate" = 1 ] && run_ablations
fi
if [ "$bench" = 1 ]; then
    cat "$logs/bench.md"
    bench_rc=$(cat "$logs/bench.rc" 2>/dev/null || echo 1)
    [ "$bench_rc" -eq 0 ] || { echo "gpu-check.sh: bench.sh failed (exit $bench_rc; see $logs/bench.log)" >&2; [ $rc -ne 0 ] || rc=$bench_rc; }
fi
[ "$ablate" = 1 ] && report_ablations
if [ "$bench_cpu" = 1 ]; then
    wait "$bench_cpu_pid" || true
    cat "$logs/bench-cpu.md"
    c_rc=$(cat "$logs/bench-cpu.rc" 2>/dev/null || echo 1)
    [ "$c_rc" -eq 0 ] || { echo "gpu-check.sh: bench.sh cpu failed (exit $c_rc; see $logs/bench-cpu.log)" >&2; [ $rc -ne 0 ] || rc=$c_rc; }
fi

if [ "$multi" = 1 ]; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "$gpus" -lt 2 ]; then
        echo "gpu-check.sh: --multi needs 2 or more GPUs, $gpus visible" >&2
        [ $rc -ne 0 ] || rc=1
    else
        n=$((gpus >= 4 ? 4 : 2))
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        step nccl-collectives timeout 120 env MOE_TEST_CUDA=1 mpirun --oversubscribe -np "$n" build-gpu/tests/test_mpi_overlap ||
            { [ $rc -ne 0 ] || rc=1; }
        step mpi-train-bf16 env MOE_RUN_TIMEOUT=90 scripts/test-mpi-train.sh build-gpu/moe "$logs/mpi-train-bf16" --device cuda --dtype bf16 ||
            { [ $rc -ne 0 ] || rc=1; }
        step scale-gpu timeout 240 scripts/scale-gpu.sh build-gpu/moe || { [ $rc -ne 0 ] || rc=1; }
        tail -n 12 "$logs/nccl-collectives.log" "$logs/mpi-train-bf16.log" "$logs/scale-gpu.log"
    fi
fi
exit "$rc"
