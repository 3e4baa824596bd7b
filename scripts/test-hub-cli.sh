#!/usr/bin/env bash
# Hugging Face hub folders through the moe program (ctest hub_cli, label cpu), against what
# transformers computed from the five fixtures in tests/fixtures/hf/: for each one,
# scripts/check-hub-fixture.py (greedy `generate --print-ids`, `logits --out` within 1e-4,
# `tokenize` on the tokenizer and chat cases); `convert DIR --out` then `generate
# --checkpoint` and `convert --to-hf` then `generate --model` give the same ids; `eval
# --model` on text; `train --set model.init_from=DIR` runs 2 steps whose first loss is the
# imported model's eval loss on the same batch, and trains on text prepared with `data
# prepare --tokenizer DIR`; bad input exits non-zero naming the file or flag.
#   scripts/test-hub-cli.sh path/to/moe [workdir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib-test.sh" "$@"
fix=$root/tests/fixtures/hf

# st.py: what the test reads from safetensors files and writes as token files (python3, no numpy).
export HUB_CHECKER=$root/scripts/check-hub-fixture.py
cat > st.py << 'PY'
import importlib.util, json, os, struct, sys

spec = importlib.util.spec_from_file_location("check_hub_fixture", os.environ["HUB_CHECKER"])
hub = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hub)  # its safetensors reader
tensors = hub.read_safetensors

def row(path, name, r, sep):  # row r of a [R, C] tensor
    shape, vals = tensors(path)[name]
    c = shape[-1]
    print(sep.join(str(int(x)) for x in vals[r * c:(r + 1) * c]))

def tokenfile(path, ids, vocab):  # a token file (moe/train/data.h) holding exactly these ids
    h = b'MOETOK1\0' + struct.pack('<IIQII', 1, vocab, len(ids), 2, 0) + struct.pack('<ddQQ', 1.0, 0.0, len(ids), 0)
    open(path, 'wb').write(h + struct.pack('<%dH' % len(ids), *ids))

def first_loss(path):  # the cross-entropy of step 1 in a metrics.jsonl (its loss less the aux and z losses)
    m = json.loads(open(path).readline())
    print('%.6f' % (m['loss'] - m['aux_loss'] - m['z_loss']))

cmd = sys.argv[1]
if cmd == 'row': row(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
elif cmd == 'tokenfile': tokenfile(sys.argv[2], [int(x) for x in sys.argv[3].split(',')], int(sys.argv[4]))
elif cmd == 'first_loss': first_loss(sys.argv[2])
PY

last_ids() { "$@" 2> err.txt | tail -1; } # the last stdout line of a command

for name in mixtral-tiny olmoe-tiny qwen2-moe-tiny qwen3-moe-tiny deepseek-v3-tiny; do
  d=$fix/$name
  exp=$d/expected.safetensors
  prompt=$(python3 st.py row "$exp" gen_prompt 0 ,)
  want="IDS $(python3 st.py row "$exp" gen_ids 0 ' ')"
  n_new=$(( $(wc -w <<< "$want") - 1 - $(tr ',' ' ' <<< "$prompt" | wc -w) ))
  gen=(--prompt-ids "$prompt" --tokens "$n_new" --temperature 0 --ignore-eos --print-ids)
  check "$name: logits, greedy ids, tokenizer and chat cases equal transformers' (check-hub-fixture.py)" \
    python3 "$root/scripts/check-hub-fixture.py" --moe "$moe" "$d"
  check "$name: convert DIR --out" "$moe" convert "$d" --out "$name.h5"
  got=$(last_ids "$moe" generate --checkpoint "$name.h5" "${gen[@]}")
  if [ "$got" = "$want" ]; then ok "$name: generate --checkpoint of the converted folder: the same ids"
  else fail "$name: generate --checkpoint: got '$got', want '$want' ($(tail -1 err.txt))"; fi
  check "$name: convert --to-hf" "$moe" convert "$name.h5" --to-hf "hf-$name"
  got=$(last_ids "$moe" generate --model "hf-$name" "${gen[@]}")
  if [ "$got" = "$want" ]; then ok "$name: generate --model of the exported folder: the same ids"
  else fail "$name: generate --model of the export: got '$got', want '$want' ($(tail -1 err.txt))"; fi
done

d=$fix/qwen3-moe-tiny
expect "generate with text and the chat template" 0 "new tokens in" "$moe" generate --model "$d" --prompt "Hello" --chat \
  --tokens 4
expect "generate --chat renders the template" 0 "<|im_start|>user" "$moe" generate --model "$d" --prompt "Hello" --chat \
  --tokens 2 --temperature 0
expect "tokenize --checkpoint of a converted folder" 0 "IDS" "$moe" tokenize --checkpoint qwen3-moe-tiny.h5 --text "Hello"
# generation_config.json: its sampling is the default (flags override), its eos ids stop.
mkdir -p gc && cp "$d"/* gc/ && rm gc/expected.safetensors
printf '{"do_sample": true, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "eos_token_id": 7}\n' > gc/generation_config.json
a=$(last_ids "$moe" generate --model gc --prompt-ids 5,6 --tokens 12 --seed 3 --eos -1 --print-ids)
b=$(last_ids "$moe" generate --model gc --prompt-ids 5,6 --tokens 12 --seed 3 --eos -1 --print-ids --temperature 0.7 \
  --top-k 5 --top-p 0.9)
c=$(last_ids "$moe" generate --model gc --prompt-ids 5,6 --tokens 12 --seed 3 --eos -1 --print-ids --temperature 0)
if [ -n "$a" ] && [ "$a" = "$b" ] && [ "$a" != "$c" ]; then ok "generation_config.json's sampling is the default"
else fail "generation_config.json's sampling: default '$a', explicit '$b', greedy '$c'"; fi
first=$(last_ids "$moe" generate --model "$d" --prompt-ids 5,6 --tokens 1 --temperature 0 --print-ids | cut -d' ' -f4)
printf '{"eos_token_id": %s}\n' "$first" > gc/generation_config.json
expect "generation_config.json's eos id stops generation" 0 "stopped at the end-of-sequence token $first" \
  "$moe" generate --model gc --prompt-ids 5,6 --tokens 5 --temperature 0

for i in $(seq 1 40); do echo "The jury said it did find that the city's election was conducted, number $i."; done > text.txt
expect "eval --model over a text file: loss, bits per byte, perplexity" 0 "perplexity" "$moe" eval --model "$d" --data text.txt --set model.seq_len=32 \
  --set data.batch_size=2 --set train.eval_batches=2

# Fine-tuning: one batch of one sequence (the token file holds seq_len + 1 ids, so the loader
# has one window), the first step's loss against eval of the imported model on the same ids.
d=$fix/olmoe-tiny
python3 st.py tokenfile one.bin "$(python3 st.py row "$d/expected.safetensors" input_ids 0 ,)" 600
ft=(--set model.init_from="$d" --set data.train_path=one.bin --set data.val_path=one.bin --set model.seq_len=23
    --set data.batch_size=1 --set train.eval_batches=1 --set train.steps=2 --set train.eval_every=2
    --set train.log_every=1 --set train.warmup=0)
check "train --set model.init_from=DIR: 2 steps" "$moe" train "$root/configs/tiny-cpu.yaml" "${ft[@]}" \
  --set checkpoint.dir=ft --quiet
train_loss=$(python3 st.py first_loss ft/metrics.jsonl 2> /dev/null)
eval_loss=$("$moe" eval --model "$d" --data one.bin --set model.seq_len=23 --set data.batch_size=1 \
  --set train.eval_batches=1 2> /dev/null | sed -n 's/^val_loss \([0-9.]*\).*/\1/p')
if [ -n "$train_loss" ] && [ -n "$eval_loss" ] && \
   python3 -c "import sys; sys.exit(abs(float('$train_loss') - float('$eval_loss')) > 1e-4)"; then
  ok "the first fine-tuning loss ($train_loss) is the imported model's eval loss ($eval_loss)"
else fail "first fine-tuning loss '$train_loss' vs the imported model's eval loss '$eval_loss'"; fi
expect "data prepare --tokenizer DIR: the folder's vocabulary" 0 "vocab 602" "$moe" data prepare --tokenizer "$d" \
  --out data-hf text.txt
check "fine-tuning on text prepared with the folder's tokenizer" "$moe" train "$root/configs/tiny-cpu.yaml" \
  --set model.init_from="$d" --set data.train_path=data-hf/train.bin --set data.val_path=data-hf/val.bin \
  --set model.seq_len=16 --set data.batch_size=2 --set train.eval_batches=1 --set train.steps=1 \
  --set checkpoint.dir=ft3 --quiet
check "a MoM model of our own trains a step" "$moe" train "$root/configs/tiny-cpu.yaml" --set data.train_path=data-hf/train.bin \
  --set data.val_path=data-hf/val.bin --set model.vocab_size=602 --set model.d_model=32 --set model.n_layers=2 \
  --set model.n_heads=2 --set model.seq_len=16 --set model.ffn_dim=24 --set model.n_experts=4 --set data.batch_size=2 \
  --set train.eval_batches=1 --set train.steps=1 --set model.mixer=mom --set checkpoint.dir=mom --quiet
expect "convert --to-hf refuses what no family can express, by name" 1 "model.mixer" "$moe" convert mom/ckpt-000001.h5 \
  --to-hf mom-hf
ckpt=$(ls ft/ckpt-*.h5 2> /dev/null | tail -1)
expect "the fine-tuned checkpoint generates text through the folder's tokenizer" 0 "The jury" \
  "$moe" generate --checkpoint "$ckpt" --prompt "The jury" --tokens 3
expect "init_from: a model key that disagrees with config.json is refused by name" 2 "model.d_model: 48" \
  "$moe" train "$root/configs/tiny-cpu.yaml" "${ft[@]}" --set model.d_model=48 --set checkpoint.dir=ft2

# Bad input: non-zero exit and a message naming the file or flag.
expect "missing folder" 1 "no-such-dir" "$moe" generate --model no-such-dir --prompt hi
mkdir -p no-tok && cp "$d/config.json" "$d/model.safetensors" no-tok/
expect "missing tokenizer.json" 1 "no-tok/tokenizer.json" "$moe" generate --model no-tok --prompt hi
expect "missing tokenizer.json: tokenize" 1 "no-tok/tokenizer.json" "$moe" tokenize --model no-tok --text hi
expect "--prompt-ids with a non-number" 2 "--prompt-ids: 'x7' is not a token id" "$moe" generate --model "$d" \
  --prompt-ids 5,x7
expect "--prompt-ids: id beyond the vocabulary" 2 "--prompt-ids: id 99999 is outside the vocabulary" "$moe" generate \
  --model "$d" --prompt-ids 5,99999
expect "logits --prompt-ids: id beyond the vocabulary" 2 "--prompt-ids: id 99999" "$moe" logits --model "$d" \
  --prompt-ids 99999
expect "tokenize --decode with a non-number" 2 "--decode: 'abc'" "$moe" tokenize --model "$d" --decode abc
expect "--prompt-ids with no ids" 2 "--prompt-ids: no token ids given" "$moe" generate --model "$d" --prompt-ids ","
expect "--model and --checkpoint together" 2 "give --model DIR or --checkpoint FILE" "$moe" generate --model "$d" \
  --checkpoint x.h5
expect "convert: a folder needs --out" 2 "--out FILE.h5" "$moe" convert "$d" --to-hf x
expect "convert: missing input" 1 "nope.h5" "$moe" convert nope.h5 --to-hf x
expect "a flag typo gets a suggestion" 2 "did you mean --prompt-ids?" "$moe" generate --model "$d" --prompt-idz 5
for c in generate eval tokenize logits convert; do expect "$c --help" 0 "usage: moe $c" "$moe" $c --help; done
expect "the interim hf-logits name is gone" 2 "unknown command 'hf-logits'" "$moe" hf-logits "$d"

echo "$fails failure(s)"
[ "$fails" = 0 ]
