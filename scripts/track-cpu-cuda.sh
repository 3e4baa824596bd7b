#!/usr/bin/env bash
# Trains configs/tiny-cpu.yaml for N steps (default 50) from the same init and data on
# the CPU (f32), on CUDA (f32) and on CUDA (bf16), and prints the per-step losses side
# by side with the largest differences. Run on a GPU machine (after scripts/build.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
moe="${MOE_BIN:-build/moe}"
steps="${1:-50}"
out="${OUT:-runs}/track"
mkdir -p "$out"
for v in cpu:f32 cuda:f32 cuda:bf16; do
  dev=${v%:*} dt=${v#*:}
  "$moe" train configs/tiny-cpu.yaml --quiet --set train.device="$dev" --set train.dtype="$dt" \
    --set train.steps="$steps" --set train.log_every=1 --set train.eval_every=0 --set checkpoint.every=0 \
    --set checkpoint.dir="$out/$dev-$dt" --overwrite >/dev/null 2>"$out/$dev-$dt.log" || { tail -5 "$out/$dev-$dt.log"; exit 1; }
  grep -o '"step":[0-9]*,"loss":[0-9.e+-]*' "$out/$dev-$dt/metrics.jsonl" | sed 's/.*"loss"://' > "$out/$dev-$dt.loss"
done
paste "$out/cpu-f32.loss" "$out/cuda-f32.loss" "$out/cuda-bf16.loss" | awk '
  { d1 = $2 - $1; d2 = $3 - $1; if (d1 < 0) d1 = -d1; if (d2 < 0) d2 = -d2;
    r1 = d1 / $1; r2 = d2 / $1; if (r1 > m1) m1 = r1; if (r2 > m2) m2 = r2;
    if (NR % 10 == 0 || NR == 1) printf "step %3d  cpu f32 %.5f  cuda f32 %.5f  cuda bf16 %.5f\n", NR, $1, $2, $3 }
  END { printf "TRACK steps=%d max_rel_diff cuda_f32=%.2e cuda_bf16=%.2e\n", NR, m1, m2 }'
