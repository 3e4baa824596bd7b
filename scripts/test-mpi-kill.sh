#!/usr/bin/env bash
# A dying rank must end the whole MPI job within 60 s, not hang it.
# Usage: scripts/test-mpi-kill.sh path/to/mpi_kill_main
# Runs mpi_kill_main under `mpirun --oversubscribe -np 4` three times; each time rank 2
# dies (SIGKILL, abort(), moe_dist_abort) while ranks 0, 1, 3 sit in an all-reduce.
# Passes when mpirun exits non-zero before the timeout and its output names rank 2.
set -u
bin=${1:?usage: $0 path/to/mpi_kill_main}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail=0
check() { # mode, pattern naming rank 2
    local mode=$1 pattern=$2 start rc elapsed
    start=$(date +%s)
    timeout 60 mpirun --oversubscribe -np 4 "$bin" "$mode" >"$log" 2>&1
    rc=$?
    elapsed=$(( $(date +%s) - start ))
    if [ "$rc" -eq 124 ]; then
        echo "FAIL $mode: mpirun still running after 60 s (a hang)"; fail=1
    elif [ "$rc" -eq 0 ]; then
        echo "FAIL $mode: mpirun exited 0 although rank 2 died"; fail=1
    elif ! grep -Eq "$pattern" "$log"; then
        echo "FAIL $mode: exit $rc but no line matching '$pattern' in:"; cat "$log"; fail=1
    else
        echo "ok   $mode: mpirun exited $rc after ${elapsed}s: $(grep -Em1 "$pattern" "$log")"
    fi
}
check kill  'process rank 2 .*exited on signal 9'
check abort 'process rank 2 .*exited on signal 6'
check moe   'moe: rank 2: disk full writing ckpt.h5'
exit $fail
