#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, runs every CPU and MPI
# test (ctest labels cpu and mpi), then the sanitizer build's cpu tests with leak
# detection (a leak at a program's exit fails its test; the fuzz replays set their own
# sanitizer options).
# CUDA tests (label cuda) need a GPU: scripts/gpu-check.sh runs them on a GPU machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/deps.sh
scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 MOE_SOURCE_DIR="$root"
# Two tests share the cores at a time (-j2): OpenMP threads that sleep while they wait,
# rather than spin, took the tests from 150 to 121 s and the sanitizer tests from 267 to
# 180 s on a 2-core machine.
export OMP_WAIT_POLICY=passive
(cd build && ctest --output-on-failure -L 'cpu|mpi' -j2)
if [ "${MOE_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== sanitizer build (address, undefined): cpu tests =="
  MOE_BUILD_DIR="$root/build-asan" scripts/build.sh -DMOE_SANITIZE=ON -DMOE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -L cpu -j2)
fi
