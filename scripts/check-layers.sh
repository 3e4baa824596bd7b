#!/usr/bin/env bash
# The rooms of the tree, checked on the #include lines of the C sources: each room may
# include only itself and the rooms below it (moe/README.md, "Rooms"). The build enforces
# the same edges at link time (one shared library per room, linked with --no-undefined);
# this check also catches a header-only crossing and names the line.
#   core/                       nothing above core/; the only user of CUDA, MPI, oneDNN, HDF5
#   router/, optim/             core/
#   moe/model/                  core/, router/
#   moe/infer/                  the model
#   moe/train/                  the model, optim/ (and the offload's routing predictor, which it trains)
#   moe/bench/                  the model, optim/
#   moe/hf/, moe/offload/       inference
#   moe/serve/                  inference, moe/hf/, moe/offload/
#   moe/cli/                    everything (the top); nothing includes it but itself
# moe/ itself holds no code. With a build folder as argument it also reads which room
# libraries each libmoe_<room>.so needs (only those whose symbols it uses are recorded)
# and checks them against the same rules. Prints every break and exits 1 when there is one.
#   scripts/check-layers.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

core='core/.*'
model="$core|router/.*|moe/model/.*"
infer="$model|moe/infer/.*"
bad=0
complain() { echo "check-layers: $*" >&2; bad=1; }

# check ALLOWED_REGEX FILES...: every quoted include of the files must match
check() {
    local allowed=$1 f inc
    shift
    for f in "$@"; do
        [ -f "$f" ] || continue
        while IFS= read -r inc; do
            [[ $inc =~ ^($allowed)$ ]] || complain "$f includes \"$inc\", outside its room"
        done < <(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$f")
    done
}

shopt -s nullglob
check "$core" core/*.[ch] core/cpu/*.[ch] core/cuda/*.cu core/cuda/*.cuh
check "$core|router/.*" router/*.[ch]
check "$core|optim/.*" optim/*.[ch]
check "$model" moe/model/*.[ch]
check "$infer" moe/infer/*.[ch]
check "$model|optim/.*|moe/train/.*|moe/offload/(predictor|trace)\.h" moe/train/*.[ch]
check "$model|optim/.*|moe/bench/.*" moe/bench/*.[ch]
check "$infer|moe/hf/.*" moe/hf/*.[ch]
check "$infer|moe/offload/.*" moe/offload/*.[ch]
check "$infer|moe/hf/.*|moe/offload/.*|moe/serve/.*" moe/serve/*.[ch]

# every folder of moe/ is a known room, and moe/ itself holds no code
for f in moe/*.[ch] moe/*/*.[ch]; do
    case $f in
    moe/model/* | moe/infer/* | moe/train/* | moe/bench/* | moe/hf/* | moe/offload/* | moe/serve/* | moe/cli/*) ;;
    *) complain "$f is in no room (moe/README.md lists them; CMakeLists.txt builds one library each)" ;;
    esac
done

# backend and file-format headers stay in core/ (tests may reach cJSON and OpenMP directly)
while IFS= read -r hit; do
    complain "$hit: a CUDA, MPI, NCCL, oneDNN or HDF5 header outside core/"
done < <(grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*<(cuda|cublas|curand|nccl|mpi|oneapi/|dnnl|hdf5|H5)' \
             -r --include='*.c' --include='*.h' --include='*.cu' router optim moe tests 2>/dev/null || true)

# the libraries: the rooms each one needs, by the symbols it uses
declare -A may=(
    [core]='' [router]='core' [optim]='core' [model]='router core' [infer]='model router core'
    [train]='model router core optim offload infer' [bench]='model router core optim'
    [hf]='infer model router core' [offload]='infer model router core'
    [serve]='hf offload infer model router core'
    [cli]='serve hf offload train bench infer model router optim core')
if [ $# -ge 1 ]; then
    for lib in "$1"/libmoe_*.so; do
        room=${lib##*/libmoe_}
        room=${room%.so}
        [ -n "${may[$room]+set}" ] || { complain "$lib: no such room"; continue; }
        for need in $(readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[libmoe_\([a-z]*\)\.so\]/\1/p'); do
            [[ " ${may[$room]} " == *" $need "* ]] || complain "$lib uses libmoe_$need.so, outside its room"
        done
    done
fi

if [ "$bad" -eq 0 ]; then echo "check-layers: every include${1:+ and library} stays in its room"; fi
exit "$bad"
