#!/usr/bin/env bash
# Runs are never lost, through the moe program (ctest label cpu): a fresh run refused in a
# directory holding a run (--overwrite starts over), clean-up that keeps the checkpoint
# just written, --resume of a missing directory, resume past a damaged newest checkpoint
# (warning naming it), `inspect --verify` and a damaged step value, early input checks,
# train.steps=0, an empty checkpoint.dir, train.threads far beyond the cores, and a full
# disk (a 64 KiB tmpfs when this user may mount one).
#   scripts/test-runs.sh path/to/moe [workdir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib-test.sh" "$@"

for i in $(seq 1 300); do echo "It was the best of times, it was the worst of times, number $((i % 7))."; done > text.txt
"$moe" data prepare --out data text.txt > /dev/null
head -c 1500 text.txt > short.txt
"$moe" data prepare --out short --val-fraction 0.02 short.txt > /dev/null
"$moe" tokenizer train --vocab 300 --out bpe.tok text.txt > /dev/null
"$moe" data prepare --tokenizer bpe.tok --out bpe text.txt > /dev/null
cfg="$root/configs/tiny-cpu.yaml"
train=("$moe" train "$cfg" --quiet --set data.train_path=data/train.bin --set data.val_path=data/val.bin
  --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=2 --set model.seq_len=16 --set model.ffn_dim=24
  --set model.n_experts=4 --set data.batch_size=4 --set train.eval_batches=2 --set train.log_every=1)

check "a run of 9 steps, a checkpoint every 3" "${train[@]}" --set checkpoint.dir=d --set train.steps=9 --set checkpoint.every=3
expect "a fresh run into it is refused, naming both ways out" 1 "continue it with --resume d, or start over with --overwrite" \
  "${train[@]}" --set checkpoint.dir=d --set train.steps=2
check "the old run is untouched" test -f d/ckpt-000009.h5
expect "--overwrite starts over" 0 "checkpoint: d/ckpt-000002.h5" "${train[@]}" --set checkpoint.dir=d --set train.steps=2 --overwrite
check "the checkpoint it names exists" test -f d/ckpt-000002.h5
check "the old run's checkpoints are gone" test ! -e d/ckpt-000009.h5
expect "--resume of a missing directory" 1 "nothing to resume" "${train[@]}" --resume nowhere/run --set train.steps=2
check "... creates nothing" test ! -e nowhere

check "a run of 3 steps" "${train[@]}" --set checkpoint.dir=e --set train.steps=3
cp e/ckpt-000003.h5 e/ckpt-000099.h5
python3 - e/ckpt-000099.h5 << 'EOF'
import sys
p = sys.argv[1]; b = bytearray(open(p, 'rb').read()); b[len(b) // 2] ^= 0xff; open(p, 'wb').write(b)
EOF
expect "inspect --verify finds the damage" 1 "failed its checksum" "$moe" inspect e/ckpt-000099.h5 --verify
expect "inspect --verify passes a good file" 0 "verified: every dataset matches its CRC-32" "$moe" inspect e/ckpt-000003.h5 --verify
expect "inspect prints the stored config" 0 "expert_parallel: 1" "$moe" inspect e/ckpt-000003.h5
expect "resume skips the damaged newest checkpoint, naming it" 0 "skipping a checkpoint: checkpoint e/ckpt-000099.h5" \
  "${train[@]}" --resume e --set train.steps=5 --set checkpoint.keep=1
check "... and keeps the one it wrote" test -f e/ckpt-000005.h5

# the step value's bytes damaged: inspect refuses to show it (it used to print the bad number)
cp e/ckpt-000005.h5 step.h5
python3 - step.h5 << 'EOF'
import sys, subprocess
p = sys.argv[1]; b = bytearray(open(p, 'rb').read())
at = [i for i in range(0, len(b) - 8) if b[i:i + 8] == (5).to_bytes(8, 'little')]
for i in at: b[i] ^= 0x40
open(p, 'wb').write(b)
EOF
expect "inspect refuses a damaged step" 1 "'step' failed its checksum" "$moe" inspect step.h5

expect "a validation file too short for one batch: found at start-up" 1 "short/val.bin holds" \
  "${train[@]}" --set checkpoint.dir=f --set data.val_path=short/val.bin --set train.steps=3
check "... before creating the run directory" test ! -e f
expect "a token file beyond the vocabulary, named" 2 "bpe/val.bin holds token ids of a vocabulary of" \
  "${train[@]}" --set checkpoint.dir=f --set data.val_path=bpe/val.bin --set train.steps=3
expect "train.steps=0 is refused" 2 "train.steps=0: nothing to train" "${train[@]}" --set checkpoint.dir=f --set train.steps=0
expect "an empty checkpoint.dir is refused" 2 "checkpoint.dir is empty" "${train[@]}" --set checkpoint.dir= --set train.steps=1
expect "train.threads=4096 is capped with a warning, and the run ends" 0 "using" \
  timeout 120 "${train[@]}" --set checkpoint.dir=g --set train.threads=4096 --set train.steps=2

mkdir -p full
if mount -t tmpfs -o size=64k tmpfs full 2> /dev/null; then
  expect "a full disk: one clear message" 1 "cannot write checkpoint full/run/ckpt-000002.h5.tmp-" \
    "${train[@]}" --set checkpoint.dir=full/run --set train.steps=2
  cp out.txt full.txt
  check "... with the system's reason" grep -q "No space left on device (flushing it to disk)" full.txt
  umount full
else
  echo "skip a full disk (cannot mount a tmpfs here)"
fi

[ $fails = 0 ] && echo "runs: all checks passed" || { echo "runs: $fails check(s) failed"; exit 1; }
