#!/usr/bin/env bash
# Where a model's decode step goes, in one run on one machine:
#   1. `moe bench decode`: ms per step, the HBM-bound fraction and issue_ms_per_step (the
#      host's time to queue a step; close to ms_per_step means the host holds the step up);
#   2. MOE_PROFILE=3: the device timeline (kernel share of the window, kernels per step; the
#      CPU falls back to wall time per kernel), with the steps run kernel by kernel
#      (--graphs off: a recorded graph hides its kernels from the timing marks);
#   3. with --ncu and Nsight Compute installed: every kernel's own duration over --ncu-steps
#      decode steps (caches flushed and clocks locked per kernel, so small kernels read long;
#      with --ncu-live clocks and caches as a real run leaves them; kernel by kernel as in 2),
#      summed per kernel into a table.
# Writes into --out: decode.txt, timeline.txt, and with --ncu ncu.csv, kernels.txt; prints
# the DECODE line and the tables.
#
# Usage: scripts/profile-decode.sh --model DIR | --checkpoint FILE [--device cuda|cpu]
#          [--batch B] [--prompt-len P] [--tokens N] [--ncu] [--ncu-live] [--ncu-steps S] [--out DIR]
#   defaults: cuda when nvidia-smi works, batch 1, prompt 128, 32 new tokens, 2 steps under
#   Nsight, out bench-results/<UTC date>-decode-profile/
# Environment: MOE_BIN (default build-gpu/moe when it exists, else build/moe), NCU (the
#   Nsight Compute program; default ncu from PATH or /usr/local/cuda*/bin).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

usage() { sed -n '2,/^# Environment/p' "$0" | sed 's/^# \{0,1\}//'; }

source_args=() device="" batch=1 prompt=128 tokens=32 ncu=0 ncu_live=() ncu_steps=2 out=""
while [ $# -gt 0 ]; do
    case "$1" in
    --model | --checkpoint) source_args=("$1" "${2:?$1 needs a value}"); shift ;;
    --device) device=${2:?--device needs cuda or cpu}; shift ;;
    --batch) batch=${2:?--batch needs a size}; shift ;;
    --prompt-len) prompt=${2:?--prompt-len needs a length}; shift ;;
    --tokens) tokens=${2:?--tokens needs a count}; shift ;;
    --ncu) ncu=1 ;;
    --ncu-live) ncu=1; ncu_live=(--clock-control none --cache-control none) ;;
    --ncu-steps) ncu_steps=${2:?--ncu-steps needs a count}; shift ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "profile-decode.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#source_args[@]} -gt 0 ] || { echo "profile-decode.sh: --model DIR or --checkpoint FILE is needed" >&2; exit 2; }
for v in "$batch" "$prompt" "$tokens" "$ncu_steps"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "profile-decode.sh: '$v' is not a positive count" >&2; exit 2; }
done
[ "$tokens" -gt 1 ] || { echo "profile-decode.sh: --tokens must be at least 2 (one decode step)" >&2; exit 2; }
if [ -z "$device" ]; then device=cpu; nvidia-smi > /dev/null 2>&1 && device=cuda; fi
moe=${MOE_BIN:-}
[ -n "$moe" ] || { moe=build/moe; [ -x build-gpu/moe ] && moe=build-gpu/moe; }
[ -x "$moe" ] || { echo "profile-decode.sh: no moe program at $moe (scripts/build.sh makes one)" >&2; exit 1; }
out=${out:-bench-results/$(date -u +%Y-%m-%d)-decode-profile}
mkdir -p "$out"

bench=("$moe" bench decode "${source_args[@]}" --device "$device" --batch "$batch" --prompt-len "$prompt")

echo "== decode: ${bench[*]} --tokens $tokens --reps 2" >&2
"${bench[@]}" --tokens "$tokens" --reps 2 > "$out/decode.txt"
grep '^DECODE' "$out/decode.txt"

echo "== device timeline (MOE_PROFILE=3)" >&2
MOE_PROFILE=3 "${bench[@]}" --tokens "$tokens" --reps 1 --graphs off > "$out/timeline.txt" 2>&1
# the timed run's decode window: its timeline line and its kernel table
grep 'device timeline.*decode steps' "$out/timeline.txt" | tail -1 || true
awk '/kernel profile.*decode steps/ { buf = $0; on = 1; next } on && /^  / { buf = buf "\n" $0; next } { on = 0 }
     END { print buf }' "$out/timeline.txt"

[ "$ncu" = 1 ] || exit 0
[ "$device" = cuda ] || { echo "profile-decode.sh: --ncu needs --device cuda" >&2; exit 2; }
nsight=${NCU:-$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2> /dev/null | head -1 || true)}
[ -n "$nsight" ] && [ -x "$nsight" ] || { echo "profile-decode.sh: no Nsight Compute (ncu) found; set NCU" >&2; exit 1; }
# Kernels of the warm-up run's prefill and first steps are skipped: count one decode step's
# kernels under MOE_PROFILE=3 (its timeline line gives kernel calls per window).
calls=$(sed -nE 's/.*batch [0-9]+, ([0-9]+) decode steps: ([0-9]+) kernel calls.*/\2 \1/p' "$out/timeline.txt" | tail -1)
[ -n "$calls" ] || { echo "profile-decode.sh: no decode timeline in $out/timeline.txt" >&2; exit 1; }
per_step=$(( ${calls% *} / ${calls#* } + 1 ))
skip=$(( per_step * (tokens / 2) ))
echo "== Nsight Compute: $ncu_steps steps (~$per_step kernels each) after $skip kernels" >&2
"$nsight" "${ncu_live[@]}" --metrics gpu__time_duration.sum --launch-skip "$skip" --launch-count $(( per_step * ncu_steps )) \
    --csv --page raw "${bench[@]}" --tokens "$tokens" --reps 1 --graphs off > "$out/ncu.csv" 2> "$out/ncu.log"
python3 - "$out/ncu.csv" "$ncu_steps" > "$out/kernels.txt" << 'EOF'
import collections, csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
h = rows[head]
name_col, time_col = h.index("Kernel Name"), h.index("gpu__time_duration.sum")
unit = rows[head + 1][time_col]
scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "nsecond": 1e-3}.get(unit, 1e-3)
total, calls = collections.defaultdict(float), collections.Counter()
for r in rows[head + 2:]:
    if len(r) <= max(name_col, time_col):
        continue
    try:
        t = float(r[time_col].replace(",", "")) * scale
    except ValueError:
        continue
    name = r[name_col].split("(")[0].replace("void ", "").replace("__nv_bfloat16", "bf16").strip()
    total[name] += t
    calls[name] += 1
steps = float(sys.argv[2])
print(f"{sum(calls.values())} kernels over about {steps:g} decode steps, {sum(total.values()):.1f} us in all")
print(f"{'kernel':60s} {'us/call':>9s} {'calls/step':>10s} {'us/step':>9s}")
for k, v in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"{k[:60]:60s} {v / calls[k]:9.2f} {calls[k] / steps:10.1f} {v / steps:9.1f}")
EOF
cat "$out/kernels.txt"
