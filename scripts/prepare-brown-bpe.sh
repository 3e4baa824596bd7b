#!/usr/bin/env bash
# BPE data for configs/small-gpu.yaml: trains a 32768-token BPE on the Brown text
# (data/brown/bpe.tok) and writes data/brown-bpe/{train,val}.bin. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
moe="${MOE_BIN:-build/moe}"
[ -s data/brown/brown.txt ] || scripts/get-brown.sh data/brown
[ -s data/brown/bpe.tok ] || "$moe" tokenizer train --vocab 32768 --out data/brown/bpe.tok data/brown/brown.txt
[ -s data/brown-bpe/train.bin ] || "$moe" data prepare --tokenizer data/brown/bpe.tok --out data/brown-bpe data/brown/brown.txt
