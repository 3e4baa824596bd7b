#!/usr/bin/env bash
# Offloaded generation end to end (ctest label cpu): a checkpoint converted from the OLMoE
# fixture generates the same ids with --offload under every policy as without it, at the
# least budget the refusal message names (one layer's top-k experts) and at a larger one;
# a budget below it is refused; the offload flags go with --offload only; --verbose prints
# the counters; predict and auto run with a predictor trained on the model's routing
# traces, predict also with --lookahead (alone and with the predictor); `moe bench offload` prints its OFFLOAD line, and --budget-fraction F gives the
# budget of the rest plus ceil(F x experts) expert slots (1: exactly what resident needs);
# --micro-batch (token scheduling) keeps the greedy ids of the whole batch.
#   scripts/test-offload-cli.sh path/to/moe [workdir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib-test.sh" "$@"

"$moe" convert "$root/tests/fixtures/hf/olmoe-tiny" --out olmoe.h5 > out.txt 2>&1 || fail "convert the fixture"
gen=("$moe" generate --checkpoint olmoe.h5 --prompt-ids 5,17,42,7,99,3 --tokens 16 --temperature 0 --print-ids --set model.seq_len=64)
"${gen[@]}" > ref.txt 2> ref.err || { cp ref.err out.txt; fail "generate without --offload"; }
ref=$(grep '^IDS' ref.txt)
[ -n "$ref" ] && ok "resident ids: $ref" || fail "resident ids"

expect "a budget below the dense part is refused with the bytes it needs" 1 "needs at least" \
  "${gen[@]}" --offload --gpu-memory 1000
"${gen[@]}" --offload --gpu-memory 1000 2> /dev/null | grep -q . && fail "a refused budget wrote to stdout" \
  || ok "a refused budget writes nothing to stdout (no prompt echo)"
least=$(sed -n 's/.*needs at least [^(]*(\([0-9]*\) bytes).*/\1/p' out.txt)
[ -n "$least" ] && ok "least budget $least bytes" || fail "the least budget in the message"

# a routing-path predictor of the model, for predict and auto
for i in $(seq 1 40); do echo "It was the best of times, it was the worst of times, number $i."; done > text.txt
"$moe" trace --checkpoint olmoe.h5 --data text.txt --out traces.h5 --tokens 1000 > out.txt 2>&1 || fail "trace"
"$moe" predictor train traces.h5 --out predictor.h5 --steps 30 > out.txt 2>&1 || fail "predictor train"

slot=36864 # one OLMoE-tiny expert: 3 x 64 x 48 f32 (32 experts in all)
run_policy() { # policy budget [flags...]: the resident ids, the split line and the counters
  local policy=$1 budget=$2; shift 2
  "${gen[@]}" --offload --gpu-memory "$budget" --policy "$policy" --verbose "$@" > out.txt 2> err.txt
  local rc=$?
  cat err.txt >> out.txt
  local ids=$(grep '^IDS' out.txt)
  if [ "$rc" = 0 ] && [ "$ids" = "$ref" ]; then ok "--offload --policy $policy --gpu-memory $budget: the resident ids"
  else fail "--offload --policy $policy --gpu-memory $budget: ids '$ids' (exit $rc)"; fi
  grep -q '^offload: budget .* = dense .* + KV cache .* + scratch .* + expert cache .* slots of' err.txt \
    && grep -q '^offload: total uses [0-9]* hits' err.txt \
    && ok "  the split line and the counters" || fail "  the split line and the counters"
}
for budget in "$least" $((least + 8 * slot)); do
  for policy in lru lfu cpu auto; do run_policy $policy "$budget"; done
  run_policy predict "$budget" --predictor predictor.h5
  run_policy auto "$budget" --predictor predictor.h5
  run_policy predict "$budget" --lookahead
  run_policy predict "$budget" --lookahead --predictor predictor.h5 --predict-width 4
done
run_policy resident $((least + 32 * slot))
"${gen[@]}" --offload --gpu-memory 1000 --max-gather 1 > out.txt 2>&1
small=$(sed -n 's/.*needs at least [^(]*(\([0-9]*\) bytes).*/\1/p' out.txt)
[ -n "$small" ] && [ "$small" -lt "$least" ] && ok "--max-gather 1 needs less scratch ($small < $least bytes)" \
  || fail "--max-gather 1 needs less scratch ('$small' < $least bytes)"
run_policy lru "$small" --max-gather 1
expect "resident refuses a budget short of every expert" 1 "every expert's 32 expert slots" \
  "${gen[@]}" --offload --gpu-memory $((least + 8 * slot)) --policy resident
expect "--predictor goes with predict or auto" 2 "goes with --policy predict or auto" \
  "${gen[@]}" --offload --gpu-memory 6GiB --policy lru --predictor predictor.h5
expect "--lookahead goes with predict or auto" 2 "--lookahead goes with --policy predict or auto (got lfu)" \
  "${gen[@]}" --offload --gpu-memory 6GiB --policy lfu --lookahead
expect "--lookahead without --offload" 2 "go with --offload" "${gen[@]}" --lookahead
expect "--predict-width without --predictor" 2 "--predict-width goes with --predictor" \
  "${gen[@]}" --offload --gpu-memory 6GiB --lookahead --predict-width 4

expect "--gpu-memory without --offload" 2 "go with --offload" "${gen[@]}" --gpu-memory 6GiB
expect "--offload without --gpu-memory" 2 "needs --gpu-memory" "${gen[@]}" --offload
expect "a malformed size" 2 "is not a size" "${gen[@]}" --offload --gpu-memory 6XB
grep -q "loading" out.txt && fail "a malformed size is refused only after the model loads" \
  || ok "a malformed size is refused before the model loads"
expect "an unknown policy" 2 "--policy" "${gen[@]}" --offload --gpu-memory 6GiB --policy fifo
expect "predict without a predictor" 2 "needs a predictor" "${gen[@]}" --offload --gpu-memory 6GiB --policy predict
expect "bench offload" 0 "OFFLOAD policy=lru budget=" \
  "$moe" bench offload --checkpoint olmoe.h5 --gpu-memory 64MiB --policy lru --batch 2 --tokens 4 --prompt 8
grep -Eq '^OFFLOAD policy=lru budget=[0-9]+ batch=2 tokens_per_s=[0-9.]+ hit_rate=[0-9.]+ bytes_per_token=[0-9]+ ttft_ms=[0-9.]+$' \
  out.txt && ok "bench offload line format" || fail "bench offload line format"

# token scheduling: micro-batches in arrival order or by predicted paths give the ids of
# the whole batch at once (the hash of every greedy id), and say how many experts a
# micro-batch needed
sched=("$moe" bench offload --checkpoint olmoe.h5 --gpu-memory 64MiB --batch 6 --tokens 4 --prompt 8)
whole=$("${sched[@]}" --policy lru --micro-batch 6 --schedule arrival 2>/dev/null | sed -n 's/^OFFLOAD_SCHEDULE .* ids=\([0-9a-f]*\)$/\1/p')
for args in "--policy lru --micro-batch 2 --schedule arrival" "--predictor predictor.h5 --micro-batch 2" \
            "--predictor predictor.h5 --lookahead --micro-batch 4"; do
  "${sched[@]}" $args > out.txt 2>&1
  ids=$(sed -n 's/^OFFLOAD_SCHEDULE micro_batch=[0-9]* schedule=[a-z]* forwards=[0-9]* experts_per_layer=[0-9.]* ids=\([0-9a-f]*\)$/\1/p' out.txt)
  [ -n "$whole" ] && [ "$ids" = "$whole" ] && ok "bench offload $args: the ids of the whole batch ($ids)" \
    || { fail "bench offload $args: ids '$ids', whole batch '$whole'"; tail -3 out.txt; }
done
expect "--schedule paths needs a predictor" 2 "--schedule paths needs --predictor" \
  "${sched[@]}" --policy lru --micro-batch 2 --schedule paths
expect "--schedule without --micro-batch" 2 "--schedule goes with --micro-batch" "${sched[@]}" --schedule arrival

# --budget-fraction F: the least resident budget less the experts, plus ceil(F x 32) slots
bench=("$moe" bench offload --checkpoint olmoe.h5 --batch 2 --tokens 4 --prompt 8)
"${bench[@]}" --gpu-memory 1000 --policy resident > out.txt 2>&1
all=$(sed -n 's/.*needs at least [^(]*(\([0-9]*\) bytes).*/\1/p' out.txt)
[ -n "$all" ] && ok "bench: every expert needs $all bytes" || fail "bench: the resident least budget"
for frac in 0.25 0.3 1; do
  slots=$(awk -v f=$frac 'BEGIN { s = f * 32; print (s == int(s)) ? s : int(s) + 1 }')
  want=$((all - 32 * slot + slots * slot))
  expect "bench --budget-fraction $frac: $slots slots, budget $want" 0 "OFFLOAD policy=lru budget=$want " \
    "${bench[@]}" --budget-fraction $frac --policy lru
  grep -q "budget-fraction $frac: $slots of 32 expert slots of $slot bytes (expert bytes $((32 * slot)))" out.txt \
    && grep -q "expert cache .* ($slots slots of" out.txt && ok "  said on stderr, $slots cache slots" \
    || fail "  the --budget-fraction line and the cache slots"
done
expect "bench --budget-fraction 1 holds resident" 0 "OFFLOAD policy=resident budget=$all " \
  "${bench[@]}" --budget-fraction 1 --policy resident
expect "bench --budget-fraction 0.5 does not" 1 "every expert's 32 expert slots" \
  "${bench[@]}" --budget-fraction 0.5 --policy resident
expect "bench: --gpu-memory or --budget-fraction, not both" 2 "one of them" \
  "${bench[@]}" --budget-fraction 0.5 --gpu-memory 64MiB
expect "bench: one of them is needed" 2 "one of them" "${bench[@]}" --policy lru
expect "bench: --budget-fraction 0 is out of range" 2 "out of range" "${bench[@]}" --budget-fraction 0

if [ "$fails" -gt 0 ]; then echo "$fails failed"; exit 1; fi
echo "all passed"
