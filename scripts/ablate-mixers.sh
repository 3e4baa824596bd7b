#!/usr/bin/env bash
# Token-mixer ablation (moe/README.md §2): attention vs mixture of memories (MoM) vs a
# single-memory gated delta net (gdn) vs the hybrid [attention, mom, attention, ...],
# same config and token budget, over several seeds; results table and plots under
# runs/ablate-mixers/.
#
# Usage: scripts/ablate-mixers.sh [cpu|gpu] [--seeds N] [--steps S | --horizon H] [--jobs J]
#                                 [--variants a,b] [--set key=value ...]
# The logic lives in scripts/ablate.sh (its header documents options and outputs).
exec "$(dirname "${BASH_SOURCE[0]}")/ablate.sh" mixers "$@"
