#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang-14, address + undefined sanitizers, MOE_FUZZ=ON) into
# build-fuzz/ and runs each for SECONDS (default 600) under `nice -n 10`, FUZZ_JOBS targets at a
# time (default 1). After a crash the target restarts for the time left (at most 8 crashes each).
#   scripts/fuzz.sh [SECONDS] [TARGET...]      targets: config tokenizer data checkpoint ... (all)
# Inputs that crash, leak, time out or run out of memory are saved as
# tests/fuzz/<target>/crashers/<kind>-<sha1>: fix the reader, keep the file (the cpu test
# fuzz_replay_<target> replays it and the seeds through the reader, built without libFuzzer).
# The growing corpus lives in build-fuzz/corpus/<target>/; tests/fuzz/<target>/corpus/ holds the
# seeds (add a new input that reaches new code there by hand). Logs: build-fuzz/logs/<target>.log.
# Per-target libFuzzer flags (one line, paths from the repository root): tests/fuzz/<target>/flags;
# LeakSanitizer suppressions: tests/fuzz/<target>/lsan.supp; environment (VAR=value lines):
# tests/fuzz/<target>/env.
#
# Adding a harness: write tests/fuzz/fuzz_<name>.c defining LLVMFuzzerInitialize and
# LLVMFuzzerTestOneInput (see tests/fuzz/common.h), put seed inputs in tests/fuzz/<name>/corpus/
# and an empty tests/fuzz/<name>/crashers/.keep; CMake and this script find it by its name.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-600}"
[ $# -gt 0 ] && shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.c; do t="${f#tests/fuzz/fuzz_}"; targets+=("${t%.c}"); done
fi
if ! command -v clang-14 >/dev/null || [ ! -d /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang-14 libclang-rt-14-dev libomp-14-dev >/dev/null
fi
scripts/deps.sh
build="$root/build-fuzz"
CC=clang-14 CXX=clang++-14 cmake -S "$root" -B "$build" -DMOE_FUZZ=ON -DMOE_CUDA=OFF -DMOE_MPI=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
mkdir -p "$build/logs"
if ! cmake --build "$build" -j"$(nproc)" --target "${targets[@]/#/fuzz_}" >"$build/logs/build.log" 2>&1; then
  grep -a -B2 -A8 'error' "$build/logs/build.log" | head -60
  echo "build failed: $build/logs/build.log"
  exit 1
fi

# Runs one target until its time is used; prints "<target>: N executions, C crashes".
fuzz_one() {
  local t="$1" end=$(( $(date +%s) + seconds )) execs=0 crashes=0 left flags=""
  local log="$build/logs/$t.log" dir="tests/fuzz/$t"
  [ -f "$dir/flags" ] && flags="$(cat "$dir/flags")"
  local lsan="${LSAN_OPTIONS:-}" env=()
  [ -f "$dir/lsan.supp" ] && lsan="suppressions=$root/$dir/lsan.supp${lsan:+:$lsan}"
  [ -f "$dir/env" ] && mapfile -t env < <(grep -v '^#' "$dir/env")
  mkdir -p "$build/corpus/$t" "$dir/crashers"
  : > "$log"
  while left=$(( end - $(date +%s) )); [ "$left" -gt 0 ] && [ "$crashes" -lt 8 ]; do
    local rc=0
    # shellcheck disable=SC2086
    env LSAN_OPTIONS="$lsan" "${env[@]}" nice -n 10 "$build/tests/fuzz/fuzz_$t" -max_total_time="$left" -print_final_stats=1 -timeout=10 \
      -rss_limit_mb=2048 -artifact_prefix="$root/$dir/crashers/" $flags \
      "$build/corpus/$t" "$dir/corpus" >"$log.run" 2>&1 || rc=$?
    local n
    n=$(grep -a 'stat::number_of_executed_units' "$log.run" | tail -1 | awk '{print $2}')
    execs=$(( execs + ${n:-0} ))
    { cat "$log.run"; echo "== run ended (exit $rc)"; } >>"$log"
    rm -f "$log.run"
    [ "$rc" -eq 0 ] && break
    crashes=$(( crashes + 1 ))
  done
  echo "$t: $execs executions, $crashes crashes (log $log)"
}

jobs_max="${FUZZ_JOBS:-1}"
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
  fuzz_one "$t" &
done
wait
ls -l tests/fuzz/*/crashers/ | grep -v '\.keep' || true
