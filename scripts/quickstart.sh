#!/usr/bin/env bash
# The README's main command: installs what is missing, builds, fetches the Brown corpus,
# trains the small MoE of configs/tiny-cpu.yaml on the CPU for a few minutes, prints
# validation bits per byte beside the unigram baseline, then samples text from it.
# Extra arguments go to `moe train` (e.g. --set train.steps=100).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/deps.sh
scripts/build.sh
scripts/get-brown.sh data/brown
if [ ! -s data/brown/train.bin ] || [ data/brown/brown.txt -nt data/brown/train.bin ]; then
  build/moe data prepare --out data/brown data/brown/brown.txt
fi
run=runs/quickstart
mkdir -p runs
rm -rf "$run"
build/moe train configs/tiny-cpu.yaml --set checkpoint.dir="$run" "$@" | tee "$run.log"
ckpt=$(ls "$run"/ckpt-*.h5 | tail -1)
echo "== sample =="
build/moe generate --checkpoint "$ckpt" --prompt "The jury said that " --tokens 300 --temperature 0.8
# Debian's python3 has matplotlib (scripts/deps.sh installs python3-matplotlib); a python3
# earlier on PATH (pyenv, venv) may not.
py=/usr/bin/python3
[ -x "$py" ] || py=python3
"$py" scripts/plot-run.py "$run" >/dev/null 2>&1 && echo "plots: $run/loss.png $run/expert_load.png" ||
  echo "plots: skipped (python3 with matplotlib not found)"
line=$(grep '^trained' "$run.log")
val=$(echo "$line" | sed -E 's/.*val_bpb ([0-9.]+).*/\1/')
uni=$(echo "$line" | sed -E 's/.*unigram ([0-9.]+).*/\1/')
echo "RESULT val_bpb=$val unigram_bpb=$uni"
