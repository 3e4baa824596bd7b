#!/usr/bin/env bash
# Prepacked against padded prefill: `moe bench prefill` packed (prompts back to back, no
# padding) and padded (batches of B prompts padded to their longest), and transformers'
# padded batched forward and generate(max_new_tokens=1) (scripts/bench_prefill_reference.py,
# hub folders only), the same prompts on every side (one shared generator), each a separate
# process, alternating over R rounds (the order reverses every round). Checks the lines: the
# same real_tokens and id_sum everywhere (the reference's draw is checked with --dry-run when
# it does not run), packed computes exactly the real tokens, padded at least as many;
# exit status 1 when a check or a run failed. Prints a markdown table of medians over the
# rounds (time, tokens/s of real tokens, computed tokens, peak memory, packed's speed-up)
# and one line  SPEEDUP packed_over_padded=<x>  (target: >= 2 at lengths 16..2048).
#
# Usage: scripts/bench-prefill.sh --model DIR | --checkpoint FILE [--hub DIR] [--device cuda|cpu]
#          [--dtype bf16|f32] [--prompts N] [--min-len L] [--max-len L] [--seed S] [--batch B]
#          [--rounds R] [--warmup W] [--no-reference]
#   --hub DIR: the transformers side's hub folder when moe runs a checkpoint made from it
#   (moe convert DIR --out FILE.h5); default: the --model folder.
#   defaults: cuda (bf16; f32 on the cpu), 64 prompts of 16..2048 tokens (clamped to the
#   model's context, said in the output), seed 1, batch 8, 3 rounds, 1 warm-up pass.
# Environment: MOE_BIN (default build/moe; with cuda build-gpu/moe when it exists), PYTHON
#   (the reference's, with torch and transformers; default python3), BENCH_OUT (default
#   bench-results/<date>-prefill/): prefill.txt (every line), *.log, report.md.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
src=() hub= device=cuda dtype= prompts=64 min_len=16 max_len=2048 seed=1 batch=8 rounds=3 warmup=2 reference=yes
while [ $# -gt 0 ]; do
    case "$1" in
    --model | --checkpoint) src=("$1" "$(realpath "${2:?$1 needs a path}")"); shift ;;
    --hub) hub=$(realpath "${2:?--hub needs a hub folder}"); shift ;;
    --device) device=${2:?--device needs cuda or cpu}; shift ;;
    --dtype) dtype=${2:?--dtype needs bf16 or f32}; shift ;;
    --prompts) prompts=${2:?}; shift ;;
    --min-len) min_len=${2:?}; shift ;;
    --max-len) max_len=${2:?}; shift ;;
    --seed) seed=${2:?}; shift ;;
    --batch) batch=${2:?}; shift ;;
    --rounds) rounds=${2:?}; shift ;;
    --warmup) warmup=${2:?}; shift ;;
    --no-reference) reference=no ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-prefill.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#src[@]} -eq 2 ] || { echo "bench-prefill.sh: give --model DIR or --checkpoint FILE" >&2; exit 2; }
[ -z "$hub" ] && [ "${src[0]}" = --model ] && hub=${src[1]}
: "${dtype:=$([ "$device" = cuda ] && echo bf16 || echo f32)}"

moe_bin=${MOE_BIN:-$root/build/moe}
[ -z "${MOE_BIN:-}" ] && [ "$device" = cuda ] && [ -x "$root/build-gpu/moe" ] && moe_bin=$root/build-gpu/moe
[ -x "$moe_bin" ] || { echo "bench-prefill.sh: no moe program at $moe_bin (build it, or set MOE_BIN)" >&2; exit 1; }
out=${BENCH_OUT:-$root/bench-results/$(date +%Y%m%d-%H%M%S)-prefill}
mkdir -p "$out"
: > "$out/prefill.txt"
: > "$out/moe.log"
: > "$out/reference.log"
draw=(--prompts "$prompts" --min-len "$min_len" --max-len "$max_len" --seed "$seed" --batch "$batch" --warmup "$warmup")

py=${PYTHON:-python3}
if [ "$reference" = yes ] && [ -z "$hub" ]; then
    echo "bench-prefill.sh: the transformers side needs a hub folder (--model or --hub); skipped" >&2
    reference=no
fi
if [ "$reference" = yes ] && ! "$py" -c 'import torch, transformers' 2> /dev/null; then
    echo "bench-prefill.sh: $py lacks torch or transformers; the transformers side is skipped" >&2
    reference=no
fi

failures=0
run_moe() { # mode
    echo "== round $round: moe bench prefill --mode $1" >> "$out/moe.log"
    "$moe_bin" bench prefill "${src[@]}" --device "$device" --dtype "$dtype" --mode "$1" "${draw[@]}" \
        2>> "$out/moe.log" | tee -a "$out/moe.log" | grep '^PREFILL ' >> "$out/prefill.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench-prefill.sh: moe $1 failed (see $out/moe.log)" >&2; failures=$((failures + 1)); }
}
run_reference() {
    [ "$reference" = yes ] || return 0
    echo "== round $round: bench_prefill_reference.py" >> "$out/reference.log"
    "$py" "$root/scripts/bench_prefill_reference.py" "$hub" "${draw[@]}" --device "$device" --dtype "$dtype" \
        2>> "$out/reference.log" | tee -a "$out/reference.log" | grep '^PREFILL ' >> "$out/prefill.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] ||
        { echo "bench-prefill.sh: the reference failed (see $out/reference.log)" >&2; failures=$((failures + 1)); }
}

for round in $(seq 1 "$rounds"); do
    echo "bench-prefill.sh: round $round of $rounds" >&2
    if [ $((round % 2)) -eq 1 ]; then run_moe packed; run_moe padded; run_reference
    else run_reference; run_moe padded; run_moe packed; fi
done
if [ -n "$hub" ]; then # the reference's draw, whether or not it ran
    python3 "$root/scripts/bench_prefill_reference.py" "$hub" "${draw[@]}" --dry-run 2>> "$out/reference.log" |
        grep '^DRAW ' >> "$out/prefill.txt"
fi
grep -h '^#' "$out/moe.log" | sort -u

python3 - "$out" "$rounds" "$failures" "$prompts" "$min_len" "$max_len" "$batch" "$device" "$dtype" << 'PY' | tee "$out/report.md"
import statistics, sys

out, rounds, failures = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompts, lo, hi, batch, device, dtype = sys.argv[4:10]
lines = []
with open(f"{out}/prefill.txt") as f:
    for line in f:
        kind, *fields = line.split()
        lines.append((kind, dict(kv.split("=", 1) for kv in fields)))
runs = {}
for kind, r in lines:
    if kind == "PREFILL":
        runs.setdefault(r["mode"], []).append(r)
errors = []
same = {(r.get("real_tokens"), r.get("id_sum")) for _, r in lines}
if len(same) > 1:
    errors.append(f"the sides drew different prompts (real_tokens, id_sum): {sorted(same)}")
for mode in ("packed", "padded"):
    if len(runs.get(mode, [])) != rounds:
        errors.append(f"{mode}: {len(runs.get(mode, []))} lines of {rounds}")
if runs.get("packed") and runs.get("padded"):
    packed, padded = int(runs["packed"][0]["computed_tokens"]), int(runs["padded"][0]["computed_tokens"])
    if packed != int(runs["packed"][0]["real_tokens"]):
        errors.append(f"packed computed {packed} tokens, not the {runs['packed'][0]['real_tokens']} real ones")
    if padded < packed:
        errors.append(f"padded computed fewer tokens ({padded}) than packed ({packed})")
    for kind, r in lines:
        if kind == "DRAW" and int(r["padded_tokens"]) != padded:
            errors.append(f"the reference pads to {r['padded_tokens']} tokens, moe padded computed {padded}")

med = {m: (statistics.median(float(r["ms"]) for r in rs), statistics.median(float(r["peak_bytes"]) for r in rs),
           rs[0]) for m, rs in runs.items()}
first = next((r for _, r in lines), {})  # the lengths after clamping to the model's context
print(f"Prefill of {prompts} prompts of {first.get('min_len', lo)}..{first.get('max_len', hi)} tokens, batch {batch}, "
      f"{device} {dtype}; medians of {rounds} rounds\n")
print("| mode | ms | real tokens/s | computed tokens | peak memory MiB | packed speed-up |")
print("|---|---:|---:|---:|---:|---:|")
for m in ("packed", "padded", "transformers-padded", "transformers-generate"):
    if m not in med:
        continue
    ms, peak, r = med[m]
    up = med["packed"][0] if "packed" in med else None
    print(f"| {m} | {ms:.1f} | {int(r['real_tokens']) / (ms / 1e3):.0f} | {r['computed_tokens']} | "
          f"{peak / 2**20:.1f} | {'%.2fx' % (ms / up) if up else 'NA'} |")
if "packed" in med and "padded" in med:
    print(f"\nSPEEDUP packed_over_padded={med['padded'][0] / med['packed'][0]:.2f}")
for e in errors:
    print(f"CHECK FAILED: {e}")
if not errors and not failures:
    print("checks: same prompts on every side, packed computes the real tokens, padded at least as many")
sys.exit(1 if errors or failures else 0)
PY
