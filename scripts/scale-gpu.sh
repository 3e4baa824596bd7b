#!/usr/bin/env bash
# Weak scaling on a GPU machine: trains configs/small-gpu.yaml (bf16) for a few steps on
# N = 1, 2, 4 GPUs (those visible), one rank per GPU, the experts sharded over all of
# them (parallel.expert_parallel = N) and the batch per GPU fixed (data.batch_size =
# N x B), with MOE_DIST_TIMING=1 (the device is drained around each all-to-all to time
# it). Prints, per N, the step time, tokens/s per GPU, the efficiency against N = 1,
# and the shares of the step spent in the all-to-all exchanges and waiting for the
# gradient all-reduce (the part the backward did not hide). Means over the steps after
# the first and over the ranks (the `timing:` line of `moe train`).
#   scripts/scale-gpu.sh [path/to/moe] [--ranks "1 2 4"] [--steps S] [--batch B] [--set key=value ...]
# Data: data/brown-bpe/{train,val}.bin when present (scripts/prepare-brown-bpe.sh), else a
# synthetic byte corpus (same speed: the model keeps its 32k vocabulary).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
moe=$root/build-gpu/moe
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then moe=$1; shift; fi
moe=$(realpath "$moe")
ranks="1 2 4" steps=12 batch=16 extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --ranks) ranks=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    *) echo "unknown option $1 (--ranks, --steps, --batch, --set)" >&2; exit 2 ;;
  esac
done
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "$gpus" -ge 1 ] || { echo "scale-gpu: no GPU visible (nvidia-smi -L)" >&2; exit 1; }
use=()
for n in $ranks; do if [ "$n" -le "$gpus" ]; then use+=("$n"); fi; done
[ ${#use[@]} -gt 0 ] || { echo "scale-gpu: none of --ranks \"$ranks\" fits on $gpus GPU(s)" >&2; exit 1; }
max=${use[-1]}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# NVLink multicast stays off unless asked for (it can take a shared host's GPUs down).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 MOE_DIST_TIMING=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} OMP_NUM_THREADS=$(( $(nproc) / max > 0 ? $(nproc) / max : 1 ))

data=(--set data.train_path="$root/data/brown-bpe/train.bin" --set data.val_path="$root/data/brown-bpe/val.bin")
if [ ! -f "$root/data/brown-bpe/train.bin" ]; then
  awk 'BEGIN { srand(7); for (i = 0; i < 200000; i++) { printf "%s%s", (i % 17 ? " " : "\n"), substr("the of and to a in that is was he for it with as his on be at by", 1 + int(rand() * 40), 1 + int(rand() * 9)) } }' > "$work/text.txt"
  "$moe" data prepare --out "$work/data" --val-fraction 0.2 "$work/text.txt" > /dev/null
  data=(--set data.train_path="$work/data/train.bin" --set data.val_path="$work/data/val.bin" --set data.tokenizer=byte)
fi

printf '%-5s %10s %14s %10s %22s %24s\n' GPUs "step ms" "tokens/s/GPU" efficiency "all-to-all ms (share)" "grad wait ms (share)"
base=
for n in "${use[@]}"; do
  launch=()
  [ "$n" -gt 1 ] && launch=(mpirun --oversubscribe --bind-to none -np "$n" -x OMP_NUM_THREADS -x MOE_DIST_TIMING -x NCCL_NVLS_ENABLE)
  log=$work/n$n.log
  if ! "${launch[@]}" "$moe" train "$root/configs/small-gpu.yaml" --quiet "${data[@]}" \
      --set parallel.expert_parallel="$n" --set data.batch_size=$((n * batch)) --set train.steps="$steps" \
      --set train.warmup=0 --set train.eval_every=0 --set train.eval_batches=1 --set checkpoint.every=0 \
      --set checkpoint.keep=1 --set checkpoint.dir="$work/run$n" "${extra[@]}" > "$log" 2>&1; then
    echo "scale-gpu: the run on $n GPU(s) failed:" >&2; tail -20 "$log" >&2; exit 1
  fi
  rm -rf "$work/run$n" # the checkpoint written at the end
  line=$(grep '^timing:' "$log") || { echo "scale-gpu: no timing line in the $n-GPU log" >&2; tail -5 "$log" >&2; exit 1; }
  # timing: S steps after the first, mean of R rank(s): step X ms, Y tokens/s per rank, all-to-all A ms (P% ...), gradient all-reduce not hidden W ms (Q%)
  read -r step tps a2a a2a_pct wait wait_pct < <(echo "$line" | sed -E \
    's/.*step ([0-9.]+) ms, ([0-9.]+) tokens\/s per rank, all-to-all ([0-9.]+) ms \(([0-9.]+)%.*not hidden ([0-9.]+) ms \(([0-9.]+)%.*/\1 \2 \3 \4 \5 \6/')
  base=${base:-$tps}
  printf '%-5s %10s %14s %9.0f%% %13s (%5s%%) %15s (%5s%%)\n' "$n" "$step" "$tps" "$(awk -v a="$tps" -v b="$base" 'BEGIN { print 100 * a / b }')" \
    "$a2a" "$a2a_pct" "$wait" "$wait_pct"
done
