#!/usr/bin/env bash
# Memory against time of train.recompute on an LM training step: `moe bench CASE --recompute X`
# for X = none, experts, attention, experts+attention, each a separate process (so each peak
# is its own), alternating over R rounds (the order reverses every round). Prints a markdown
# table of medians over the rounds (step time, tokens/s, peak memory = persistent + step
# arena, both against none) and writes it with every JSON line under the output folder.
#
# Usage: scripts/bench-recompute.sh [--case lm-step-cpu|lm-train-gpu] [--rounds R] [--reps N]
#          [--warmup W] [--scale S]
#   defaults: lm-step-cpu, 3 rounds of 5 timed steps after 2 warm-up steps, scale 1.
# Environment: MOE_BIN (default build/moe; build-gpu/moe for lm-train-gpu when it exists),
#   BENCH_OUT (default bench-results/<date>-recompute-<case>/): runs.jsonl, table.md.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
case_name=lm-step-cpu rounds=3 reps=5 warmup=2 scale=1
while [ $# -gt 0 ]; do
    case "$1" in
    --case) case_name=${2:?--case needs lm-step-cpu or lm-train-gpu}; shift ;;
    --rounds) rounds=${2:?}; shift ;;
    --reps) reps=${2:?}; shift ;;
    --warmup) warmup=${2:?}; shift ;;
    --scale) scale=${2:?}; shift ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-recompute.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$case_name" in lm-step-cpu | lm-train-gpu) ;; *) echo "bench-recompute.sh: --case is lm-step-cpu or lm-train-gpu" >&2; exit 2 ;; esac

moe_bin=${MOE_BIN:-$root/build/moe}
[ -z "${MOE_BIN:-}" ] && [ "$case_name" = lm-train-gpu ] && [ -x "$root/build-gpu/moe" ] && moe_bin=$root/build-gpu/moe
[ -x "$moe_bin" ] || { echo "bench-recompute.sh: no moe program at $moe_bin (build it, or set MOE_BIN)" >&2; exit 1; }
out=${BENCH_OUT:-$root/bench-results/$(date +%Y%m%d-%H%M%S)-recompute-$case_name}
mkdir -p "$out"
: > "$out/runs.jsonl"

settings=(none experts attention experts,attention)
failed=0
for ((r = 1; r <= rounds; r++)); do
    order=("${settings[@]}")
    if ((r % 2 == 0)); then order=(experts,attention attention experts none); fi
    for x in "${order[@]}"; do
        echo "round $r/$rounds: $case_name --recompute $x" >&2
        line=$("$moe_bin" bench "$case_name" --json --recompute "$x" --reps "$reps" --warmup "$warmup" --scale "$scale" \
                 2>> "$out/moe.log" | tail -1)
        if [ -z "$line" ]; then echo "  failed (see $out/moe.log)" >&2; failed=1; continue; fi
        echo "$line" >> "$out/runs.jsonl"
    done
done

python3 - "$out/runs.jsonl" "$out/table.md" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if not runs:
    sys.exit("bench-recompute.sh: no runs")
by = {}
for r in runs:
    by.setdefault(r["recompute"], []).append(r)
def med(rs, k): return statistics.median(x[k] for x in rs)
base = by.get("none")
r0 = runs[0]
lines = [f"{r0['case']} on {r0['device']} {r0['dtype']}, {r0['threads']} threads"
         + (f", {r0['gpu']}" if "gpu" in r0 else "") + f"; medians of {len(by.get('none', []))} rounds "
         f"of {r0['reps']} steps (moe {r0['version']})", "",
         "| recompute | step ms | tokens/s | peak MiB | of which step arena | time vs none | peak vs none | "
         "step arena vs none | step ms over rounds |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
for name in ["none", "experts", "attention", "experts,attention"]:
    rs = by.get(name)
    if not rs: continue
    ms, pk = med(rs, "ms"), med(rs, "peak_bytes")
    rel = lambda v, k: f"{v / med(base, k):.2f}x" if base else "-"
    spread = " ".join(f"{x['ms']:.1f}" for x in rs)
    sp = med(rs, "step_peak_bytes")
    lines.append(f"| {name} | {ms:.1f} | {med(rs, 'tokens_per_s'):.0f} | {pk / 2**20:.1f} | {sp / 2**20:.1f} | "
                 f"{rel(ms, 'ms')} | {rel(pk, 'peak_bytes')} | {rel(sp, 'step_peak_bytes')} | {spread} |")
text = "\n".join(lines) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
PY
echo "written: $out/table.md, $out/runs.jsonl" >&2
exit $failed
