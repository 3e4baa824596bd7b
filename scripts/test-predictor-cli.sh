#!/usr/bin/env bash
# Routing traces and the routing-path predictor end to end (ctest label cpu): `moe trace`
# of the OLMoE fixture as a hub folder and as our checkpoint (one fingerprint: a predictor
# trained on one trace evaluates the other), `moe predictor train` prints recall beside
# chance and token identity, size and time, `moe predictor eval` the recall and token
# scheduling; a predictor of another model, missing or damaged traces and bad flags are
# refused with the file or flag named.
#   scripts/test-predictor-cli.sh path/to/moe [workdir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib-test.sh" "$@"

olmoe=$root/tests/fixtures/hf/olmoe-tiny
for i in $(seq 1 60); do echo "It was the best of times, it was the worst of times, number $((i % 7))."; done > text.txt
expect "trace a hub folder" 0 "traced 1024 tokens (32 sequences of 32)" \
  "$moe" trace --model "$olmoe" --data text.txt --out hub.h5 --tokens 1024 --context 32
"$moe" convert "$olmoe" --out olmoe.h5 > out.txt 2>&1 || fail "convert the fixture"
expect "trace our checkpoint of it" 0 "wrote ckpt.h5" \
  "$moe" trace --checkpoint olmoe.h5 --data text.txt --out ckpt.h5 --tokens 1024 --context 32

expect "predictor train: recall beside chance and token identity" 0 "token-id" \
  "$moe" predictor train hub.h5 --out pred.h5 --steps 200 --log-every 0
grep -q "^mean " out.txt && ok "  the mean recall line" || fail "the mean recall line"
grep -q "^size: .* parameters = .*% of the model's" out.txt && ok "  its size" || fail "its size"
grep -q "^time: .* us per token = .*% of a decode step" out.txt && ok "  its time" || fail "its time"
chance=$(awk '$1 == "mean" {print $4}' out.txt)
recall=$(awk '$1 == "mean" {print $2}' out.txt)
awk -v r="$recall" -v c="$chance" 'BEGIN {exit !(r > c + 0.1)}' && ok "  held-out recall $recall > chance $chance + 0.1" \
  || fail "held-out recall $recall against chance $chance"

expect "predictor eval on the checkpoint's trace (same fingerprint)" 0 "grouped by predicted paths" \
  "$moe" predictor eval ckpt.h5 --predictor pred.h5 --micro-batch 4
grep -q "^mean " out.txt && ok "  its recall" || fail "its recall"

"$moe" trace --model "$root/tests/fixtures/hf/qwen3-moe-tiny" --data text.txt --out other.h5 --tokens 256 --context 32 \
  > out.txt 2>&1 || fail "trace another model"
expect "a predictor of another model is refused by name" 1 "pred.h5 was made for model $olmoe" \
  "$moe" predictor eval other.h5 --predictor pred.h5
expect "a missing trace is named" 1 "missing.h5" "$moe" predictor train missing.h5 --out x.h5
head -c 3000 /dev/urandom > junk.h5
expect "a damaged trace is named" 1 "junk.h5" "$moe" predictor eval junk.h5 --predictor pred.h5
expect "a checkpoint is not a trace" 1 "not a routing trace" "$moe" predictor train olmoe.h5 --out x.h5
expect "a damaged predictor is named" 1 "junk.h5" "$moe" predictor eval hub.h5 --predictor junk.h5

expect "predictor without a subcommand" 2 "usage: moe predictor train" "$moe" predictor
expect "train without --out" 2 "--out FILE is required" "$moe" predictor train hub.h5
expect "eval without --predictor" 2 "--predictor FILE is required" "$moe" predictor eval hub.h5
expect "a misspelt flag" 2 "did you mean --steps" "$moe" predictor train hub.h5 --out x.h5 --stpes 3
expect "trace without --data" 2 "--data FILE and --out FILE are required" "$moe" trace --model "$olmoe"
expect "trace --context beyond the model's" 2 "exceeds the model's context" \
  "$moe" trace --model "$olmoe" --data text.txt --out x.h5 --context 100000

if [ "$fails" -gt 0 ]; then echo "$fails check(s) failed"; exit 1; fi
echo "all predictor CLI checks passed"
