#!/usr/bin/env bash
# Router ablation: top-k softmax (Switch balance) vs RMoE vs RMoE with the detached
# recurrent state vs OT routing vs top-k with the aux-loss-free bias, same config and
# token budget, over several seeds; results table and plots under runs/ablate-routers/.
#
# Usage: scripts/ablate-routers.sh [cpu|gpu] [--seeds N] [--steps S | --horizon H] [--jobs J]
#                                  [--variants a,b] [--set key=value ...]
# The longer run (3 seeds, 4x the config's steps: 4.8x the tokens of the 500-step H200
# table): scripts/ablate-routers.sh gpu --seeds 3 --horizon 4
# The logic lives in scripts/ablate.sh (its header documents options and outputs).
exec "$(dirname "${BASH_SOURCE[0]}")/ablate.sh" routers "$@"
