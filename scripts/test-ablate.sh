#!/usr/bin/env bash
# The recall ablation's pipeline on the CPU (ctest label cpu): a tiny grid (attention on
# MQAR, seeds 1 and 2) trains and writes its table; the same grid stopped by TERM while
# seed 1 trains, then run again with --continue, resumes that run from its checkpoint to
# the same per-step losses as the uninterrupted grid and trains seed 2, and a third
# --continue call keeps every trained run; --continue with other settings is refused and
# leaves the runs as they were; --report --merge of the first grid's runs.csv alone gives
# back its runs. The router ablation's table from runs on disk lists a stopped run at
# its last evaluation.
#   scripts/test-ablate.sh path/to/moe [workdir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib-test.sh" "$@"
export MOE_BIN=$moe

grid=("$root/scripts/ablate-mqar.sh" cpu --mixers attention --seeds 2 --seq-lens 32 --pairs 4 --vocab 64 --train 2000
      --steps 80 --set data.batch_size=16 --set train.log_every=1)
losses() { sed -nE 's/.*"step":([0-9]+),"loss":([-0-9.e+naif]+).*/\1 \2/p' "$1/metrics.jsonl"; }
runs_of() { echo "$work/$1/runs/ablate-mqar"; }

check "the grid trains and writes its table" "${grid[@]}" --work "$work/a" --out "$work/a/out"
grep -q '^| attention | 32 |' a/out/table.md && ok "table.md has the mixer" || fail "table.md has the mixer"
ref=$(runs_of a)/attention-T32-P4-s1
[ "$(losses "$ref" | wc -l)" = 80 ] && ok "the reference run logged 80 steps" || fail "the reference run logged 80 steps"

check "--report --merge rebuilds the runs from runs.csv alone" "$root/scripts/ablate-mqar.sh" cpu --report \
  --mixers attention --seeds 2 --seq-lens 32 --pairs 4 --vocab 64 --work "$work/m" --out "$work/m/out" \
  --merge "$work/a/out/runs.csv"
cmp -s a/out/runs.csv m/out/runs.csv && grep -q '^| attention | 32 |' m/out/table.md \
  && ok "the merged runs and table are the trained ones" || fail "the merged runs and table are the trained ones"

# The same grid, stopped by TERM (as `timeout` stops it) once attention has logged 20 steps.
"${grid[@]}" --work "$work/b" --out "$work/b/out" > stopped.txt 2>&1 &
pid=$!
run=$(runs_of b)/attention-T32-P4-s1
for _ in $(seq 1 600); do [ "$(losses "$run" 2>/dev/null | wc -l)" -ge 20 ] && break; sleep 0.1; done
kill -TERM $pid
wait $pid
if ls "$run"/ckpt-*.h5 > /dev/null 2>&1 && ! grep -q '^trained' "$run/train.log"; then ok "TERM left a checkpoint of an unfinished run"
else fail "TERM left a checkpoint of an unfinished run"; cat stopped.txt | tail -5; fi

expect "--continue resumes the stopped run" 0 "attention-T32-P4-s1: resuming from its checkpoint" \
  "${grid[@]}" --work "$work/b" --out "$work/b/out" --continue
cmp -s <(losses "$run") <(losses "$ref") && ok "the resumed run has the uninterrupted run's losses" \
  || { fail "the resumed run has the uninterrupted run's losses"; diff <(losses "$run") <(losses "$ref") | head -4; }
expect "a second --continue keeps the trained runs" 0 "attention-T32-P4-s2: trained before, kept" \
  "${grid[@]}" --work "$work/b" --out "$work/b/out" --continue
grep -q "attention-T32-P4-s1: trained before, kept" out.txt && ! grep -q "resuming" out.txt \
  && ok "nothing trained again" || fail "nothing trained again"

before=$(cat "$run/args.txt")
expect "--continue with other settings is refused" 2 "holds a run made with other settings" \
  "${grid[@]}" --work "$work/b" --out "$work/b/out" --continue --set train.lr=0.01
[ "$(cat "$run/args.txt")" = "$before" ] && grep -q '^trained' "$run/train.log" \
  && ok "the refused call left the runs as they were" || fail "the refused call left the runs as they were"

# The router table from runs on disk (ablate.sh --report --out): a run that finished is in
# the table with its final figures; a run stopped after its evaluation at step 20 is
# listed below it at that evaluation, not in the means.
r=$work/routers
rm -rf "$r"
mkdir -p "$r/topk-s1" "$r/topk-s2"
for s in 1 2; do echo "model: 1.23M parameters (1234567; 0.50M active per token)" > "$r/topk-s$s/train.log"; done
echo "trained 40 steps: loss 2.1000, val_loss 2.2500, val_bpb 3.2461 (unigram 4.4398), 1500 tokens/s, 0 skipped steps" \
  >> "$r/topk-s1/train.log"
for st in 20 40; do echo "{\"step\":$st,\"loss\":2.2,\"val_loss\":2.25,\"val_bpb\":3.2461}"; done > "$r/topk-s1/metrics.jsonl"
{ echo '{"step":10,"loss":2.9}'; echo '{"step":20,"loss":2.6,"val_loss":2.5,"val_bpb":3.6067}'; echo '{"step":30,"loss":2.4}'; } \
  > "$r/topk-s2/metrics.jsonl"
check "--report writes the router table from the runs on disk" "$root/scripts/ablate-routers.sh" cpu --report \
  --seeds 2 --out "$r"
grep -q '^| topk | 1/2 | 2.2500 | 3.2461 | 1500 |' "$r/results.md" && ok "the finished run is in the table" \
  || { fail "the finished run is in the table"; cat "$r/results.md"; }
grep -q '^Runs stopped before the end' "$r/results.md" && grep -q '^| topk | 2 | 20 | 2.5000 | 3.6067 |' "$r/results.md" \
  && ok "the stopped run is listed at its last evaluation" \
  || { fail "the stopped run is listed at its last evaluation"; cat "$r/results.md"; }

[ $fails = 0 ] && echo "ablate: all checks passed" || { echo "ablate: $fails check(s) failed"; exit 1; }
