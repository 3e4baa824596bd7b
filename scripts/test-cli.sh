#!/usr/bin/env bash
# The moe program end to end (ctest label cpu): data prepare, train, eval, generate,
# inspect, BPE tokenizer, config errors, missing and damaged checkpoints, the generate
# timing line and the latency-balance start-up line, and Ctrl-C
# (a checkpoint, exit 130, then --resume continues).
#   scripts/test-cli.sh path/to/moe [workdir]
set -uo pipefail
moe=$(realpath "$1")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${2:-$(mktemp -d)}
rm -rf "$work"; mkdir -p "$work"; cd "$work"
export OMP_NUM_THREADS=1
fails=0
check() { # description, command...: the command must succeed
  local what=$1; shift
  if "$@" > out.txt 2>&1; then echo "ok   $what"; else echo "FAIL $what"; tail -5 out.txt; fails=$((fails + 1)); fi
}
expect() { # description, exit code, text in the output, command...
  local what=$1 code=$2 text=$3; shift 3
  "$@" > out.txt 2>&1
  local rc=$?
  if [ "$rc" = "$code" ] && grep -qF -- "$text" out.txt; then echo "ok   $what"
  else echo "FAIL $what (exit $rc, want $code and '$text')"; tail -5 out.txt; fails=$((fails + 1)); fi
}

for i in $(seq 1 300); do echo "It was the best of times, it was the worst of times, number $((i % 7))."; echo; done > text.txt
small=(--set data.train_path=data/train.bin --set data.val_path=data/val.bin --set model.d_model=32 --set model.n_layers=2
  --set model.n_heads=2 --set model.seq_len=16 --set model.ffn_dim=24 --set model.n_experts=4 --set data.batch_size=4
  --set train.eval_batches=2 --set train.log_every=1)
cfg="$root/configs/tiny-cpu.yaml"

check "data prepare" "$moe" data prepare --out data text.txt
check "train" "$moe" train "$cfg" "${small[@]}" --set train.steps=6 --set train.eval_every=3 --set checkpoint.dir=run --quiet
ckpt=$(ls run/ckpt-*.h5 | tail -1)
check "metrics.jsonl has val_loss and tokens_per_s" grep -q '"val_loss".*"tokens_per_s"\|"tokens_per_s".*"val_loss"' run/metrics.jsonl
expect "eval" 0 "val_loss" "$moe" eval --checkpoint "$ckpt"
expect "generate" 0 "It was" "$moe" generate --checkpoint "$ckpt" --prompt "It was" --tokens 20
expect "generate reports its speed" 0 "new tokens in" "$moe" generate --checkpoint "$ckpt" --prompt "It was" --tokens 20
expect "latency balance prints the measured latencies" 0 "latency balance, layer 0: expert latency" "$moe" train "$cfg" \
  "${small[@]}" --set router.balance=latency --set train.steps=1 --set checkpoint.dir=run5
expect "inspect" 0 "params/layers.0.moe.experts.3.w13" "$moe" inspect "$ckpt"
check "tokenizer train" "$moe" tokenizer train --vocab 300 --out bpe.tok text.txt
check "data prepare with BPE" "$moe" data prepare --tokenizer bpe.tok --out data-bpe text.txt
printf 'model:\n  d_model: 64\n  n_expert: 4\n' > bad.yaml
expect "unknown key: file:line:column and a suggestion" 2 "bad.yaml:3:3" "$moe" train bad.yaml
expect "bad --set value" 2 "--set model.top_k=many" "$moe" train "$cfg" --set model.top_k=many
expect "bf16 on the cpu: a config error naming the fix" 2 "train.dtype=f32" "$moe" generate --checkpoint "$ckpt" --set train.dtype=bf16
expect "missing checkpoint" 1 "nope.h5" "$moe" eval --checkpoint nope.h5
head -c 3000 "$ckpt" > damaged.h5
expect "damaged checkpoint" 1 "damaged" "$moe" generate --checkpoint damaged.h5
expect "missing data file" 1 "missing.bin" "$moe" train "$cfg" "${small[@]}" --set data.train_path=missing.bin --set checkpoint.dir=run2

# Diverging training (SGD, lr 10, no clipping): non-finite steps are skipped and counted, and
# after train.max_bad_steps in a row training stops with a message and a non-zero exit.
expect "NaN/Inf steps skipped, then a stop" 1 "steps in a row had a non-finite loss" "$moe" train "$cfg" "${small[@]}" \
  --set train.optimizer=sgd --set train.lr=10 --set train.warmup=0 --set train.grad_clip=0 --set train.steps=200 \
  --set train.max_bad_steps=3 --set checkpoint.dir=run4
check "skipped steps are logged" grep -q '"skipped":true' run4/metrics.jsonl

# Ctrl-C: a checkpoint at the interrupted step, exit 130, then resume to the end.
"$moe" train "$cfg" "${small[@]}" --set train.steps=100000 --set train.eval_every=0 --set checkpoint.dir=run3 --quiet > int.txt 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -s run3/metrics.jsonl ] && break; sleep 0.1; done
kill -INT $pid
wait $pid
rc=$?
if [ "$rc" = 130 ] && ls run3/ckpt-*.h5 > /dev/null 2>&1 && grep -q "resume with --resume" int.txt; then echo "ok   Ctrl-C saves and exits 130"
else echo "FAIL Ctrl-C (exit $rc)"; tail -3 int.txt; fails=$((fails + 1)); fi
step=$(ls run3/ckpt-*.h5 | tail -1 | sed -E 's/.*ckpt-0*([0-9]+)\.h5/\1/')
check "resume after Ctrl-C" "$moe" train "$cfg" "${small[@]}" --set train.steps=$((step + 3)) --set train.eval_every=0 \
  --set checkpoint.dir=run3 --resume run3 --quiet
check "resumed to the end" test -f "run3/ckpt-$(printf '%06d' $((step + 3))).h5"

[ $fails = 0 ] && echo "cli: all checks passed" || { echo "cli: $fails check(s) failed"; exit 1; }
