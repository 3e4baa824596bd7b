#!/usr/bin/env bash
# N ranks equal one rank, end to end (ctest label mpi): trains a small MoE for 20 steps
# with 1 rank, with 2 and 4 ranks under pure data parallelism and under expert
# parallelism 2 and 4, and checks that every step's loss equals the 1-rank loss within
# 1e-4 relative; then saves at 4 ranks (EP=4) after 10 steps and resumes with 2 ranks
# (EP=2) and with 1 rank, which must continue with the same losses.
#   scripts/test-mpi-train.sh path/to/moe [workdir]
set -euo pipefail
moe=$(realpath "$1")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work"
cd "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1

for i in $(seq 1 300); do echo "the quick brown fox $((i % 13)) jumps over the lazy dog; a stitch in time saves nine."; echo; done > text.txt
"$moe" data prepare --out data text.txt > /dev/null

common=(--quiet --set data.train_path=data/train.bin --set data.val_path=data/val.bin
  --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=2 --set model.seq_len=16 --set model.ffn_dim=24
  --set model.n_experts=4 --set model.top_k=2 --set data.batch_size=8 --set train.schedule=constant --set train.warmup=0
  --set train.lr=3e-3 --set train.log_every=1 --set train.eval_every=0 --set train.eval_batches=2
  --set checkpoint.every=0 --set checkpoint.keep=0)

run() { # name ranks ep steps [extra args]
  local name=$1 np=$2 ep=$3 steps=$4; shift 4
  local launch=()
  [ "$np" -gt 1 ] && launch=(mpirun --oversubscribe -np "$np")
  if ! timeout 300 "${launch[@]}" "$moe" train "$root/configs/tiny-cpu.yaml" "${common[@]}" \
      --set parallel.expert_parallel="$ep" --set train.steps="$steps" --set checkpoint.dir="runs/$name" "$@" \
      > "$name.log" 2>&1; then
    echo "FAIL: run $name (ranks $np, ep $ep) failed:"; tail -20 "$name.log"; exit 1
  fi
  grep -o '"step":[0-9]*,"loss":[0-9.e+-]*' "runs/$name/metrics.jsonl" | sed 's/"step":\([0-9]*\),"loss":/\1 /' > "$name.loss"
}

compare() { # reference candidate first_step
  awk -v name="$2" -v first="$3" 'NR == FNR { ref[$1] = $2; next }
    $1 >= first { n++; d = $2 - ref[$1]; if (d < 0) d = -d; r = d / (ref[$1] > 0 ? ref[$1] : 1); if (r > m) m = r }
    END { ok = n > 0 && m <= 1e-4; printf "%s %s: %d steps, max relative loss difference %.2e\n", ok ? "ok  " : "FAIL", name, n, m; exit !ok }' \
    "$1.loss" "$2.loss"
}

run one 1 1 20
fail=0
for v in "dp2 2 1" "ep2 2 2" "dp4 4 1" "ep2x2 4 2" "ep4 4 4"; do
  set -- $v
  run "$1" "$2" "$3" 20
  compare one "$1" 1 || fail=1
done
# save at 4 ranks (EP=4), resume at 2 ranks (EP=2) and at 1 rank
run save4 4 4 10
for v in "resume2 2 2" "resume1 1 1"; do
  set -- $v
  rm -rf "runs/$1"; mkdir -p "runs/$1"; cp runs/save4/ckpt-*.h5 "runs/$1/"
  cp runs/save4/metrics.jsonl "runs/$1/"
  run "$1" "$2" "$3" 20 --resume "runs/$1"
  compare one "$1" 11 || fail=1
done
[ $fail = 0 ] && echo "mpi train: all runs equal the 1-rank run" || { echo "mpi train: FAILED"; exit 1; }
