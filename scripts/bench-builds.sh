#!/usr/bin/env bash
# Did a change make training or inference slower? Runs the same `moe bench` cases with two
# builds of the program (A = before, B = after) on the same machine in one run, alternating
# which goes first every round, and prints per case and phase the median ms of each, the
# spread over rounds, and the speed of B relative to A (A's ms / B's ms: above 1 = B is
# faster), and the peak memory of each (persistent + step arena, the largest over rounds)
# with B's over A's.
#
# Usage: scripts/bench-builds.sh cpu|gpu MOE_A MOE_B [--rounds R] [--reps N] [--warmup W] [--cases "A B"]
#                                [--device cpu|cuda] [--scale S]
#        scripts/bench-builds.sh decode MOE_A MOE_B --model DIR [--device cuda|cpu] [--batch 1,4,16]
#                                [--prompt-len P] [--tokens N] [--rounds R] [--reps N]
#   cpu: moe-layer-cpu lm-step-cpu, 2 threads pinned to cores 0,1 when taskset works
#   gpu: moe-layer-gpu moe-layer-gpu-fine lm-train-gpu
#   --device runs the cases there (e.g. lm-train-gpu on the cpu, f32), --scale divides their
#   batch (`moe bench --scale`)
#   decode: `moe bench decode` of a hub folder (or --checkpoint FILE): per batch, the prefill
#     (case prefill-b<B>) and the ms per decode step (decode-b<B>); defaults cuda when
#     nvidia-smi works, batch 1,4,16, prompt 128, 64 new tokens, 2 timed runs a round
# Each program finds its own libmoe through its build folder (or LD_LIBRARY_PATH: set
# MOE_A_LIB / MOE_B_LIB to the folder of each build's libmoe_*.so when they are copies).
# Output: a markdown table, then one line per figure
#   BUILDS <case>-<phase> a_ms=<ms> b_ms=<ms> speed_b_over_a=<ratio> a_peak_mib=<MiB> b_peak_mib=<MiB>
# Raw JSON lines go to $BENCH_OUT (default bench-results/<date>-builds-<mode>/).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in -h | --help) sed -n '2,/^# Raw JSON/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
mode=${1:?usage: bench-builds.sh cpu|gpu|decode MOE_A MOE_B [options] (--help)}
moe_a=${2:?the first (before) moe program}
moe_b=${3:?the second (after) moe program}
shift 3
rounds=3 reps=10 warmup=3 cases="" source=() device="" batch=1,4,16 prompt=128 tokens=64 scale=1
[ "$mode" = decode ] && reps=2
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) rounds=${2:?--rounds needs a number}; shift ;;
    --reps) reps=${2:?--reps needs a number}; shift ;;
    --warmup) warmup=${2:?--warmup needs a number}; shift ;;
    --cases) cases=${2:?--cases needs case names}; shift ;;
    --model | --checkpoint) source=("$1" "${2:?$1 needs a path}"); shift ;;
    --device) device=${2:?--device needs cuda or cpu}; shift ;;
    --batch) batch=${2:?--batch needs sizes}; shift ;;
    --prompt-len) prompt=${2:?--prompt-len needs a length}; shift ;;
    --tokens) tokens=${2:?--tokens needs a count}; shift ;;
    --scale) scale=${2:?--scale needs a number}; shift ;;
    -h | --help) sed -n '2,/^# Raw JSON/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-builds.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for p in "$moe_a" "$moe_b"; do [ -x "$p" ] || { echo "bench-builds.sh: no program at $p" >&2; exit 1; }; done

extra=() pin=()
if [ "$mode" = decode ]; then
    [ ${#source[@]} = 2 ] || { echo "bench-builds.sh: decode needs --model DIR or --checkpoint FILE" >&2; exit 2; }
    if [ -z "$device" ]; then device=cpu; nvidia-smi >/dev/null 2>&1 && device=cuda; fi
    cases=decode
elif [ "$mode" = cpu ]; then
    : "${cases:=moe-layer-cpu lm-step-cpu}"
    export OMP_NUM_THREADS=2
    extra=(--threads 2)
    if command -v taskset >/dev/null && taskset -c 0,1 true 2>/dev/null; then pin=(taskset -c 0,1); fi
else
    : "${cases:=moe-layer-gpu moe-layer-gpu-fine lm-train-gpu}"
fi

out=${BENCH_OUT:-$root/bench-results/$(date +%Y%m%d-%H%M%S)-builds-$mode}
mkdir -p "$out"
: >"$out/a.jsonl"
: >"$out/b.jsonl"

run() { # side program libdir case
    local side=$1 prog=$2 lib=$3 c=$4 args
    if [ "$mode" = decode ]; then
        args=(--json --reps "$reps" "${source[@]}" --device "$device" --batch "$batch" --prompt-len "$prompt" --tokens "$tokens")
    else
        args=(--json --reps "$reps" --warmup "$warmup" --scale "$scale" ${device:+--device "$device"} "${extra[@]}")
    fi
    env ${lib:+LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"} "${pin[@]}" \
        "$prog" bench "$c" "${args[@]}" \
        >>"$out/$side.jsonl" 2>>"$out/$side.log" || echo "bench-builds.sh: $side failed on $c (see $out/$side.log)" >&2
}

for round in $(seq 1 "$rounds"); do
    echo "bench-builds.sh: round $round of $rounds ($mode: $cases)" >&2
    for c in $cases; do
        if [ $((round % 2)) -eq 1 ]; then
            run a "$moe_a" "${MOE_A_LIB:-}" "$c"; run b "$moe_b" "${MOE_B_LIB:-}" "$c"
        else
            run b "$moe_b" "${MOE_B_LIB:-}" "$c"; run a "$moe_a" "${MOE_A_LIB:-}" "$c"
        fi
    done
done

python3 - "$out" <<'PY' | tee "$out/report.md"
import json, os, statistics, sys

out = sys.argv[1]

def load(side):
    ms, peak = {}, {}
    with open(os.path.join(out, side + ".jsonl")) as f:
        for line in f:
            if line.startswith("{"):
                r = json.loads(line)
                if "kind" in r:  # moe bench decode: PREFILL ms, DECODE ms per step, per batch
                    key = "%s-b%d" % (r["kind"].lower(), r["batch"])
                    ms.setdefault(key, []).append(r["ms"] if r["kind"] == "PREFILL" else r["ms_per_step"])
                else:
                    key = r["case"] + "-" + r["phase"]
                    ms.setdefault(key, []).append(r["ms"])
                if r.get("peak_bytes"):
                    peak[key] = max(peak.get(key, 0), r["peak_bytes"] / 2**20)
    return ms, peak

(a, pa), (b, pb) = load("a"), load("b")
print("| case-phase | A ms (median, min-max) | B ms (median, min-max) | speed B/A | A peak MiB | B peak MiB | peak B/A |")
print("|---|---|---|---|---|---|---|")
lines = []
for key in sorted(set(a) | set(b)):
    ma = statistics.median(a[key]) if key in a else None
    mb = statistics.median(b[key]) if key in b else None
    span = lambda v: "%.2f (%.2f-%.2f)" % (statistics.median(v), min(v), max(v)) if v else "NA"
    ratio = "%.3f" % (ma / mb) if ma and mb else "NA"
    fa, fb = pa.get(key), pb.get(key)
    mib = lambda v: "%.1f" % v if v else "NA"
    pratio = "%.3f" % (fb / fa) if fa and fb else "NA"
    print("| %s | %s | %s | %s | %s | %s | %s |" % (key, span(a.get(key)), span(b.get(key)), ratio, mib(fa), mib(fb), pratio))
    lines.append("BUILDS %s a_ms=%s b_ms=%s speed_b_over_a=%s a_peak_mib=%s b_peak_mib=%s" % (
        key, "%.3f" % ma if ma else "NA", "%.3f" % mb if mb else "NA", ratio, mib(fa), mib(fb)))
print()
print("\n".join(lines))
PY
