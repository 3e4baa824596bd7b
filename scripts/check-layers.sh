#!/usr/bin/env bash
# The layers of the tree, checked on the #include lines of the C sources: each room may
# include only the rooms below it.
#   core/                                  nothing above core/
#   router/                                core/
#   model: moe/model/                      core/, router/
#   inference: moe/infer/                  core/, router/, the model (never optim/ or the trainer)
# Prints every include that breaks a rule and exits 1 when there is one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

model='moe/model/[a-z_]+\.h'
bad=0
# check ROOM_FILES... -- ALLOWED_REGEX: every quoted include of the files must match
check() {
    local allowed=${!#} files=("${@:1:$#-1}") f inc
    for f in "${files[@]}"; do
        [ -f "$f" ] || continue
        while IFS= read -r inc; do
            if ! [[ $inc =~ ^($allowed)$ ]]; then
                echo "check-layers: $f includes \"$inc\", outside its layer" >&2
                bad=1
            fi
        done < <(sed -n 's/^#include "\([^"]*\)".*/\1/p' "$f")
    done
}

shopt -s nullglob
check core/*.[ch] core/cpu/*.[ch] 'core/.*'
check router/*.[ch] 'core/.*|router/.*'
check moe/model/*.[ch] "core/.*|router/.*|$model"
check moe/infer/*.[ch] "core/.*|router/.*|$model|moe/infer/.*"
if [ "$bad" -eq 0 ]; then echo "check-layers: every include stays in its layer"; fi
exit "$bad"
