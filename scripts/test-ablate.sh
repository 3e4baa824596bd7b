#!/usr/bin/env bash
# The recall ablation's pipeline on the CPU (ctest label cpu): a tiny grid (attention on
# MQAR, seeds 1 and 2) trains and writes its table; the same grid stopped by TERM while
# seed 1 trains, then run again with --continue, resumes that run from its checkpoint to
# the same per-step losses as the uninterrupted grid and trains seed 2, and a third
# --continue call keeps every trained run; --continue with other settings is refused and
# leaves the runs as they were; --report --merge of the first grid's runs.csv alone gives
# back its runs.
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

[ $fails = 0 ] && echo "ablate: all checks passed" || { echo "ablate: $fails check(s) failed"; exit 1; }
