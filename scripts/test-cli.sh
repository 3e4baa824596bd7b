#!/usr/bin/env bash
# The moe program end to end (ctest label cpu): data prepare, train, eval, generate,
# inspect, BPE tokenizer, config errors, missing and damaged checkpoints (one that crashes
# libhdf5 too), the generate timing line and the latency-balance start-up line, Ctrl-C (a
# checkpoint, exit 130, then --resume continues), strict flags (ranges, unknown flags, --help), and what
# generate produces: its new tokens, the sliding window, --eos, --prompt-file, and a BPE
# checkpoint's own tokenizer.
#   scripts/test-cli.sh path/to/moe [workdir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib-test.sh" "$@"

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
# metadata damaged so that libhdf5 itself crashes on it: refused, the program goes on (the
# sanitizer build reports the crash and the reader stops: the same refusal)
expect "checkpoint that crashes libhdf5" 1 "is damaged: reading it" "$moe" generate \
  --checkpoint "$root/tests/fuzz/checkpoint/crashers/symbol-table-segv-in-hdf5.h5"
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

# Strict flags: numbers checked in full and for range, unknown flags refused with the
# nearest known one, --help for every command, exit status 2 for usage errors.
expect "--temperature nan refused" 2 "--temperature 'nan' is not a number" "$moe" generate --checkpoint "$ckpt" --temperature nan
expect "--tokens -1 refused" 2 "--tokens -1 is out of range" "$moe" generate --checkpoint "$ckpt" --tokens -1
expect "--tokens abc refused" 2 "--tokens 'abc' is not an integer" "$moe" generate --checkpoint "$ckpt" --tokens abc
expect "--top-p 2 refused" 2 "--top-p 2 is out of range (expected a number in [0, 1])" "$moe" generate --checkpoint "$ckpt" --top-p 2
expect "--top-k -5 refused" 2 "--top-k -5 is out of range" "$moe" generate --checkpoint "$ckpt" --top-k -5
expect "tokenizer train --vocab 256 says why" 2 "--vocab 256 is out of range (expected an integer in [257," \
  "$moe" tokenizer train --vocab 256 --out t.tok text.txt
expect "--val-fraction 1 refused" 2 "--val-fraction 1 is out of range (expected a number in (0, 1))" \
  "$moe" data prepare --out d --val-fraction 1 text.txt
expect "eval: unknown flag with a suggestion" 2 "unknown flag --checkpont (did you mean --checkpoint?)" "$moe" eval --checkpont "$ckpt"
expect "generate: unknown flag with a suggestion" 2 "unknown flag --temprature (did you mean --temperature?)" \
  "$moe" generate --checkpoint "$ckpt" --temprature 1
expect "data prepare: unknown flag" 2 "unknown flag --tokeniser (did you mean --tokenizer?)" "$moe" data prepare --out d --tokeniser byte text.txt
expect "tokenizer train: unknown flag" 2 "unknown flag --vocabs (did you mean --vocab?)" "$moe" tokenizer train --vocabs 300 --out t.tok text.txt
expect "bench: unknown flag" 2 "unknown flag --rep (did you mean --reps?)" "$moe" bench sgemm --rep 1
expect "config: unknown flag" 2 "unknown flag --sett (did you mean --set?)" "$moe" config "$cfg" --sett model.top_k=1
expect "generate: a stray argument" 2 "unexpected argument 'extra'" "$moe" generate --checkpoint "$ckpt" extra
for c in "eval" "generate" "data prepare" "tokenizer train" "bench" "config"; do
  expect "$c --help lists its flags" 0 "--help" "$moe" $c --help
done
expect "generate --help shows ranges and defaults" 0 "--top-p P" "$moe" generate --help

# data prepare takes any number of inputs (70 files of 10 bytes: 700 tokens in all).
mkdir -p many && for i in $(seq 1 70); do printf 'line %03d.\n' "$i" > many/$i.txt; done
"$moe" data prepare --out data-many many/*.txt > out.txt 2>&1
n=$(sed -nE 's/.* ([0-9]+) train tokens, ([0-9]+) val tokens.*/\1 + \2/p' out.txt)
if [ -n "$n" ] && [ $((n)) = 700 ]; then echo "ok   data prepare reads all 70 inputs"
else echo "FAIL data prepare with 70 inputs ($n tokens, want 700)"; cat out.txt; fails=$((fails + 1)); fi

# eval --data: a token file gives the same figures as the config's val path; a text file works too.
"$moe" eval --checkpoint "$ckpt" > e1.txt 2>&1
"$moe" eval --checkpoint "$ckpt" --data data/val.bin > e2.txt 2>&1
if [ "$(cut -d' ' -f1-5 e1.txt)" = "$(cut -d' ' -f1-5 e2.txt)" ] && grep -q val_loss e2.txt; then echo "ok   eval --data TOKENFILE"
else echo "FAIL eval --data TOKENFILE"; cat e1.txt e2.txt; fails=$((fails + 1)); fi
expect "eval --data TEXTFILE" 0 "from text.txt" "$moe" eval --checkpoint "$ckpt" --data text.txt

# generate: the GENERATED tokens (byte tokenizer: one byte each). stdout is the prompt, the new
# tokens and a newline; seq_len is 16, so 40 new tokens after a 6-token prompt slide the window.
gen() { "$moe" generate --checkpoint "$ckpt" --prompt "It was" "$@" > g.txt 2> g.err; }
gen --temperature 0 --tokens 40; cp g.txt greedy1.txt; cp g.err greedy.err
gen --temperature 0 --tokens 40; cp g.txt greedy2.txt
printf 'It was' > prompt.txt
if cmp -s greedy1.txt greedy2.txt && [ "$(wc -c < greedy1.txt)" = $((6 + 40 + 1)) ] && cmp -s -n 6 greedy1.txt prompt.txt \
  && [ "$(tail -c 1 greedy1.txt | od -An -tu1 | tr -d ' ')" = 10 ]; then echo "ok   generate --temperature 0: same 40 new tokens twice"
else echo "FAIL generate --temperature 0 ($(wc -c < greedy1.txt) bytes, want 47)"; fails=$((fails + 1)); fi
check "generate slides the window at the context and says so" grep -q "context of 16 tokens is full" greedy.err
expect "generate: a prompt longer than the context is cut, with a message" 0 "the prompt has 20 tokens, the model's context 16" \
  "$moe" generate --checkpoint "$ckpt" --prompt "It was the best of t" --tokens 3
check "generate's timing line counts the new tokens" grep -q "prompt of 6 tokens in .* 40 new tokens" greedy.err
gen --seed 5 --tokens 30; cp g.txt s5a.txt
gen --seed 5 --tokens 30; cp g.txt s5b.txt
gen --seed 6 --tokens 30; cp g.txt s6.txt
if cmp -s s5a.txt s5b.txt && ! cmp -s s5a.txt s6.txt; then echo "ok   generate: the seed fixes the sample"
else echo "FAIL generate seeds"; fails=$((fails + 1)); fi
# --eos: a greedy run (CHECKPOINT, its 40-token output FILE) stops before the first
# occurrence of its 6th new byte, which is not written.
eos_check() {
  tail -c +7 "$2" | head -c 40 > new.bin
  local b k
  b=$(od -An -tu1 -j5 -N1 new.bin | tr -d ' ')
  k=$(od -An -tu1 -v new.bin | tr -s ' ' '\n' | grep -v '^$' | grep -n -x "$b" | head -1 | cut -d: -f1)
  "$moe" generate --checkpoint "$1" --prompt "It was" --temperature 0 --tokens 40 --eos "$b" > g.txt 2> g.err
  { cat prompt.txt; head -c $((k - 1)) new.bin; echo; } > want.txt
  if cmp -s g.txt want.txt && grep -q "stopped at the end-of-sequence token $b" g.err; then echo "ok   generate stops at --eos ($1)"
  else echo "FAIL generate --eos $b with $1 (want $((k - 1)) new bytes)"; od -c g.txt | head -3; cat g.err; fails=$((fails + 1)); fi
}
eos_check "$ckpt" greedy1.txt
expect "generate --eos beyond the vocabulary" 2 "--eos 300 is not a token" "$moe" generate --checkpoint "$ckpt" --eos 300
# --prompt-file (a file, and - for stdin) gives the --prompt run
"$moe" generate --checkpoint "$ckpt" --prompt-file prompt.txt --temperature 0 --tokens 40 > g.txt 2> /dev/null
check "generate --prompt-file" cmp g.txt greedy1.txt
"$moe" generate --checkpoint "$ckpt" --prompt-file - --temperature 0 --tokens 40 < prompt.txt > g.txt 2> /dev/null
check "generate --prompt-file - (stdin)" cmp g.txt greedy1.txt
expect "generate: --prompt and --prompt-file" 2 "not both" "$moe" generate --checkpoint "$ckpt" --prompt a --prompt-file prompt.txt
# the text ends with its newline before the timing line, also when both go to one pipe
"$moe" generate --checkpoint "$ckpt" --prompt "It was" --tokens 5 --device cpu --dtype f32 2>&1 | tail -1 > last.txt
check "generate: the timing line comes after the text's newline" grep -q "^generate: prompt of .* on cpu f32" last.txt

# After the slide the model sees the last 8 tokens only: with untrained, untied weights (greedy
# output that varies with the context) the 9 tokens after the first slide (bytes 17..25) are
# those a fresh run gives with the 8 bytes before them (bytes 9..16) as its prompt.
"$moe" train "$cfg" "${small[@]}" --set model.tie_embeddings=false --set model.init_std=0.5 --set train.lr=0 \
  --set train.min_lr=0 --set train.steps=1 --set checkpoint.dir=run-random --quiet > out.txt 2>&1
"$moe" generate --checkpoint run-random/ckpt-000001.h5 --prompt "It was" --tokens 20 --temperature 0 > slide.txt 2> /dev/null
tail -c +10 slide.txt | head -c 8 > window.bin
"$moe" generate --checkpoint run-random/ckpt-000001.h5 --prompt-file window.bin --tokens 9 --temperature 0 > fresh.txt 2> /dev/null
if [ "$(wc -c < slide.txt)" = 27 ] && [ "$(tail -c +18 slide.txt | head -c 9 | od -An -tu1)" = "$(tail -c +9 fresh.txt | head -c 9 | od -An -tu1)" ]
then echo "ok   generate after the slide sees the last half of the window"
else echo "FAIL generate after the slide"; od -An -tu1 slide.txt fresh.txt; fails=$((fails + 1)); fi
"$moe" generate --checkpoint run-random/ckpt-000001.h5 --prompt "It was" --tokens 40 --temperature 0 > random40.txt 2> /dev/null
eos_check run-random/ckpt-000001.h5 random40.txt

# A BPE run's checkpoint carries its tokenizer: it generates with the tokenizer file gone.
"$moe" train "$cfg" "${small[@]}" --set data.train_path=data-bpe/train.bin --set data.val_path=data-bpe/val.bin \
  --set data.tokenizer=bpe --set data.tokenizer_path=bpe.tok --set model.vocab_size=300 --set train.steps=2 \
  --set checkpoint.dir=run-bpe --quiet > out.txt 2>&1
bck=$(ls run-bpe/ckpt-*.h5 | tail -1)
"$moe" inspect "$bck" > inspect.txt 2>&1
check "the checkpoint holds /tokenizer" grep -qE "^  tokenizer +u8" inspect.txt
mv bpe.tok bpe.tok.away
expect "generate with the checkpoint's own tokenizer" 0 "new tokens in" "$moe" generate --checkpoint "$bck" --prompt "It was" --tokens 5
mv bpe.tok.away bpe.tok

[ $fails = 0 ] && echo "cli: all checks passed" || { echo "cli: $fails check(s) failed"; exit 1; }
