#!/usr/bin/env bash
# A hub model's prefill, decode and tokenizer speed on our stack beside transformers and
# tokenizers, same machine, same prompt ids, one run: `moe bench decode` / `moe bench
# tokenize` against scripts/bench_hub_reference.py, alternating which side goes first every
# round, several rounds; per figure the median over rounds and the spread (min-max). Prints a
# markdown table and one line per figure:
#   HUB decode-b<B> ours=<tokens/s> ref=<tokens/s> ratio=<ours/ref> ours_bound=<f> ref_bound=<f>
#   HUB prefill-b<B> ours=<tokens/s> ref=<tokens/s> ratio=<ours/ref>
#   HUB peak-b<B> ours_gib=<GiB> ref_gib=<GiB>
#   HUB tokenize ours=<MB/s> ref=<MB/s> ratio=<ours/ref> tokens=<n>
# "bound" is the fraction of the memory-bandwidth bound of a decode step (moe/cli/bench_decode.c:
# the weight bytes the step reads over the copy rate measured in the same run; the reference's
# uses our bytes per step, the same prompts routing alike). NA marks a side that did not run
# (its log says why); the exit status is then 1, and also when the two tokenizers' token counts
# differ.
#
# Usage: scripts/bench-hub.sh [--model DIR] [--make olmoe-1b-7b|small] [--rounds R] [--reps N]
#          [--device cuda|cpu] [--batch 1,16] [--prompt-len P] [--tokens N] [--data FILE] [--cache static]
#   --model   the hub folder (default bench-results/hub-model); --make writes a random-weight
#             one there first (scripts/make-hub-model.py) unless it already has config.json
#   --data    the tokenizer's text (default data/brown/brown.txt when present, else ~5 MB of the
#             repository's READMEs repeated)
#   --cache   transformers' KV cache in generate (default dynamic)
#   --keep    add these rounds to the results already in $BENCH_OUT (numbering and the side
#             that goes first go on from there), so that rounds may be spread over several
#             runs; the table covers them all
#   defaults: 3 rounds, 2 timed runs per round and side, cuda when nvidia-smi works, batch 1,16,
#             prompt 128, 128 new tokens
#        scripts/bench-hub.sh --smoke MOE_BIN   (ctest): moe bench decode and tokenize on
#             tests/fixtures/hf/olmoe-tiny on the cpu, the lines' format and positive numbers
#             checked, and the table built from them
# Environment: MOE_BIN (default build-gpu/moe when it exists, else build/moe), PYTHON (the
#   reference's python: needs torch, transformers, tokenizers), BENCH_OUT (results folder;
#   default bench-results/<date>-hub/): ours.txt, ref.txt, *.log, report.md.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# The table from ours.txt and ref.txt in $1 (python3, standard library only).
report() {
    python3 - "$1" <<'PY'
import os, statistics, sys

out = sys.argv[1]

def load(name):
    recs = {}
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return recs
    for line in open(path):
        w = line.split()
        if not w or w[0] not in ("DECODE", "PREFILL", "TOKENIZE") or not (len(w) > 1 and w[1].startswith("impl=")):
            continue
        kv = dict(x.split("=", 1) for x in w[1:] if "=" in x)
        recs.setdefault((w[0], kv.get("batch", "")), []).append(kv)
    return recs

ours, ref = load("ours.txt"), load("ref.txt")

def vals(recs, key, field):
    v = []
    for r in recs.get(key, []):
        try:
            v.append(float(r[field]))
        except (KeyError, ValueError):
            pass
    return v

def med(recs, key, field):
    v = vals(recs, key, field)
    return statistics.median(v) if v else None

def cell(recs, key, field, scale=1.0, spec=".1f"):
    v = vals(recs, key, field)
    if not v:
        return "NA"
    m, lo, hi = statistics.median(v), min(v), max(v)
    return f"{m * scale:{spec}} ({lo * scale:{spec}}-{hi * scale:{spec}})" if len(v) > 1 else f"{m * scale:{spec}}"

def fmt(v, spec=".3f"):
    return "NA" if v is None else format(v, spec)

def ratio(a, b):
    return a / b if a and b else None

def first(v):
    return v[0] if v else None

batches = sorted({k[1] for k in list(ours) + list(ref) if k[0] == "DECODE"}, key=int)
rounds = max([len(v) for v in list(ours.values()) + list(ref.values())] or [0])
print(f"# hub model bench: moe against transformers ({rounds} round(s); median (min-max) over rounds)")
print()
print("| batch | decode tok/s ours | decode tok/s transformers | ratio | ms/step ours | ms/step transformers "
      "| prefill tok/s ours | prefill tok/s transformers | ratio | peak GiB ours | peak GiB transformers "
      "| bound ours | bound transformers |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
lines, bad = [], False
for b in batches:
    d, p = ("DECODE", b), ("PREFILL", b)
    od, rd = med(ours, d, "tokens_per_s"), med(ref, d, "tokens_per_s")
    op, rp = med(ours, p, "tokens_per_s"), med(ref, p, "tokens_per_s")
    ob = med(ours, d, "bound_fraction")
    step_bytes, copy = med(ours, d, "step_bytes"), med(ours, d, "copy_gb_per_s")
    rms = med(ref, d, "ms_per_step")
    rb = step_bytes / (copy * 1e9) * 1e3 / rms if step_bytes and copy and rms else None
    oo, rr = med(ours, d, "peak_bytes"), med(ref, d, "peak_bytes")
    print(f"| {b} | {cell(ours, d, 'tokens_per_s')} | {cell(ref, d, 'tokens_per_s')} | {fmt(ratio(od, rd), '.2f')} "
          f"| {cell(ours, d, 'ms_per_step', spec='.2f')} | {cell(ref, d, 'ms_per_step', spec='.2f')} "
          f"| {cell(ours, p, 'tokens_per_s', spec='.0f')} | {cell(ref, p, 'tokens_per_s', spec='.0f')} "
          f"| {fmt(ratio(op, rp), '.2f')} | {fmt(oo and oo / 2**30, '.2f')} | {fmt(rr and rr / 2**30, '.2f')} "
          f"| {fmt(ob)} | {fmt(rb)} |")
    lines.append(f"HUB decode-b{b} ours={fmt(od, '.2f')} ref={fmt(rd, '.2f')} ratio={fmt(ratio(od, rd))} "
                 f"ours_bound={fmt(ob)} ref_bound={fmt(rb)}")
    lines.append(f"HUB prefill-b{b} ours={fmt(op, '.2f')} ref={fmt(rp, '.2f')} ratio={fmt(ratio(op, rp))}")
    lines.append(f"HUB peak-b{b} ours_gib={fmt(oo and oo / 2**30)} ref_gib={fmt(rr and rr / 2**30)}")
    bad |= None in (od, rd, op, rp)
t = ("TOKENIZE", "")
om, rm = med(ours, t, "mb_per_s"), med(ref, t, "mb_per_s")
ot, rt = vals(ours, t, "tokens"), vals(ref, t, "tokens")
print()
print("| tokenizer (one thread) | MB/s ours | MB/s tokenizers | ratio | tokens/s ours | tokens/s tokenizers "
      "| tokens ours | tokens tokenizers |")
print("|---|---|---|---|---|---|---|---|")
print(f"| encode | {cell(ours, t, 'mb_per_s', spec='.2f')} | {cell(ref, t, 'mb_per_s', spec='.2f')} "
      f"| {fmt(ratio(om, rm), '.2f')} | {cell(ours, t, 'tokens_per_s', spec='.0f')} "
      f"| {cell(ref, t, 'tokens_per_s', spec='.0f')} | {fmt(first(ot), '.0f')} | {fmt(first(rt), '.0f')} |")
lines.append(f"HUB tokenize ours={fmt(om, '.2f')} ref={fmt(rm, '.2f')} ratio={fmt(ratio(om, rm))} "
             f"tokens={fmt(first(ot), '.0f')}")
bad |= om is None or rm is None
if ot and rt and set(ot) != set(rt):
    lines.append(f"HUB tokenize MISMATCH: moe counted {sorted(set(ot))} tokens, tokenizers {sorted(set(rt))}")
    bad = True
print()
print("Peak: ours = the device's PERSIST + STEP arena peaks (core/memory.h); transformers = "
      "torch.cuda.max_memory_allocated. Bound: the decode step's weight bytes (dense + the distinct routed "
      "experts) over the measured copy rate, as a fraction of the measured step.")
print()
print("\n".join(lines))
sys.exit(1 if bad else 0)
PY
}

# ctest: the moe side on the tiny fixture; every figure present and positive.
smoke() {
    local moe_bin=$1
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    local fixture=tests/fixtures/hf/olmoe-tiny
    OMP_NUM_THREADS=1 "$moe_bin" bench decode --model "$fixture" --device cpu --batch 1,3 --prompt-len 8 --tokens 4 \
        --reps 1 >"$tmp/ours.txt"
    "$moe_bin" bench tokenize --model "$fixture" --data README.md --reps 1 >>"$tmp/ours.txt"
    cat "$tmp/ours.txt"
    local num='[0-9]+(\.[0-9]+)?'
    local want=(
        "^PREFILL impl=moe batch=1 tokens=8 ms=$num tokens_per_s=$num peak_bytes=[0-9]+$"
        "^DECODE impl=moe batch=1 tokens_per_s=$num ms_per_step=$num bound_fraction=$num peak_bytes=[0-9]+ step_bytes=[0-9]+ copy_gb_per_s=$num issue_ms_per_step=$num graphs=(on|off)$"
        "^PREFILL impl=moe batch=3 tokens=24 "
        "^DECODE impl=moe batch=3 "
        "^TOKENIZE impl=moe mb_per_s=$num tokens=[0-9]+ bytes=[0-9]+ lines=[0-9]+ ms=$num tokens_per_s=[0-9]+$")
    for re in "${want[@]}"; do
        grep -Eq "$re" "$tmp/ours.txt" || { echo "bench-hub smoke: no line matches '$re'" >&2; return 1; }
    done
    # every number positive (a zero rate or size means the bench measured nothing)
    awk '{for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] != "impl" && kv[1] != "graphs" && !(kv[2] + 0 > 0)) {
            print "bench-hub smoke: " kv[1] " is not positive: " $0 > "/dev/stderr"; bad = 1 } } }
         END { exit bad }' "$tmp/ours.txt"
    # bytes per step: more experts are read for 3 sequences than for 1
    awk '/^DECODE/ { for (i = 2; i <= NF; i++) if ($i ~ /^step_bytes=/) { split($i, kv, "="); b[n++] = kv[2] } }
         END { if (!(b[1] > b[0])) { print "bench-hub smoke: batch 3 reads no more bytes than batch 1" > "/dev/stderr"; exit 1 } }' \
        "$tmp/ours.txt"
    # MOE_PROFILE=3 (on the CPU: timed as level 1): the prefill's and the decode steps' windows
    # apart, and decode steps attend through the paged cache
    MOE_PROFILE=3 OMP_NUM_THREADS=1 "$moe_bin" bench decode --model "$fixture" --device cpu --batch 1 --prompt-len 8 \
        --tokens 4 --reps 1 >/dev/null 2>"$tmp/profile.txt"
    grep -q '^kernel profile (MOE_PROFILE) batch 1 prefill: ' "$tmp/profile.txt" &&
        awk '/^kernel profile \(MOE_PROFILE\) batch 1, 3 decode steps: /{f = 1; next} /^kernel profile/{f = 0}
             f && $1 == "attention_paged" {ok = 1} END {exit !ok}' "$tmp/profile.txt" ||
        { echo "bench-hub smoke: MOE_PROFILE=3 gave no prefill window or no attention_paged in the decode steps" >&2
          cat "$tmp/profile.txt" >&2; return 1; }
    report "$tmp" >"$tmp/report.md" || true # the reference side is absent here: NA, status 1
    grep -q '^HUB decode-b3 ours=[0-9.]* ref=NA' "$tmp/report.md" &&
        grep -q '^HUB tokenize ours=[0-9.]* ref=NA' "$tmp/report.md" ||
        { echo "bench-hub smoke: the report lacks the expected lines" >&2; cat "$tmp/report.md" >&2; return 1; }
    echo "bench-hub smoke: ok"
}

if [ "${1:-}" = --smoke ]; then
    smoke "${2:?--smoke needs the moe program}"
    exit
fi

model=bench-results/hub-model make="" rounds=3 reps=2 batch=1,16 prompt=128 tokens=128 data="" cache=dynamic keep=0
device=cpu
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && device=cuda
while [ $# -gt 0 ]; do
    case "$1" in
    --model) model=${2:?--model needs a folder}; shift ;;
    --make) make=${2:?--make needs a shape}; shift ;;
    --rounds) rounds=${2:?--rounds needs a number}; shift ;;
    --reps) reps=${2:?--reps needs a number}; shift ;;
    --device) device=${2:?--device needs cuda or cpu}; shift ;;
    --batch) batch=${2:?--batch needs sizes}; shift ;;
    --prompt-len) prompt=${2:?--prompt-len needs a number}; shift ;;
    --tokens) tokens=${2:?--tokens needs a number}; shift ;;
    --data) data=${2:?--data needs a file}; shift ;;
    --cache) cache=${2:?--cache needs dynamic or static}; shift ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-hub.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

moe_bin=${MOE_BIN:-build-gpu/moe}
[ -x "$moe_bin" ] || moe_bin=build/moe
[ -x "$moe_bin" ] || { echo "bench-hub.sh: no moe program at $moe_bin (build it, or set MOE_BIN)" >&2; exit 1; }
py=${PYTHON:-python3}
out=${BENCH_OUT:-bench-results/$(date +%Y%m%d-%H%M%S)-hub}
mkdir -p "$out"
for f in ours.txt ref.txt ours.log ref.log; do
    [ "$keep" = 1 ] && [ -f "$out/$f" ] || : >"$out/$f"
done
done_rounds=$(grep -c '^== round .*moe bench decode' "$out/ours.log" || true)

if [ -n "$make" ]; then
    if [ -f "$model/config.json" ]; then
        echo "bench-hub.sh: $model already holds a model; not made again" >&2
    else
        "$py" scripts/make-hub-model.py "$model" --shape "$make" >&2
    fi
fi
[ -f "$model/config.json" ] || { echo "bench-hub.sh: no hub folder at $model (--make olmoe-1b-7b makes one)" >&2; exit 1; }

if [ -z "$data" ]; then
    if [ -f data/brown/brown.txt ]; then
        data=data/brown/brown.txt
    else # ~5 MB of the repository's own prose
        data=$out/text.txt
        : >"$data"
        while [ "$(stat -c %s "$data")" -lt 5000000 ]; do cat README.md ./*/README.md >>"$data"; done
    fi
fi

{
    date -Is
    [ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1
    "$moe_bin" --version 2>&1 | head -3
} >"$out/machine.txt" || true

failures=0
ours_decode() {
    echo "== round $round: moe bench decode" >>"$out/ours.log"
    "$moe_bin" bench decode --model "$model" --device "$device" --batch "$batch" --prompt-len "$prompt" \
        --tokens "$tokens" --reps "$reps" >>"$out/ours.txt" 2>>"$out/ours.log" ||
        { echo "bench-hub.sh: moe bench decode failed (see $out/ours.log)" >&2; failures=$((failures + 1)); }
}
ref_decode() {
    echo "== round $round: bench_hub_reference.py" >>"$out/ref.log"
    "$py" scripts/bench_hub_reference.py "$model" --device "$device" --batch "$batch" --prompt-len "$prompt" \
        --tokens "$tokens" --reps "$reps" --cache "$cache" >>"$out/ref.txt" 2>>"$out/ref.log" ||
        { echo "bench-hub.sh: the transformers side failed (see $out/ref.log)" >&2; failures=$((failures + 1)); }
}
ours_tokenize() {
    OMP_NUM_THREADS=1 "$moe_bin" bench tokenize --model "$model" --data "$data" --reps "$reps" \
        >>"$out/ours.txt" 2>>"$out/ours.log" ||
        { echo "bench-hub.sh: moe bench tokenize failed (see $out/ours.log)" >&2; failures=$((failures + 1)); }
}
ref_tokenize() {
    "$py" scripts/bench_hub_reference.py "$model" --tokenize "$data" --reps "$reps" >>"$out/ref.txt" 2>>"$out/ref.log" ||
        { echo "bench-hub.sh: the tokenizers side failed (see $out/ref.log)" >&2; failures=$((failures + 1)); }
}

for round in $(seq $((done_rounds + 1)) $((done_rounds + rounds))); do
    echo "bench-hub.sh: round $round of $((done_rounds + rounds)) ($model on $device, batch $batch)" >&2
    if [ $((round % 2)) -eq 1 ]; then
        ours_decode; ref_decode; ours_tokenize; ref_tokenize
    else
        ref_decode; ours_decode; ref_tokenize; ours_tokenize
    fi
done

status=0
report "$out" | tee "$out/report.md" || status=1
echo "bench-hub.sh: results in $out" >&2
[ "$failures" -eq 0 ] || { echo "bench-hub.sh: $failures run(s) failed (NA in the table)" >&2; exit 1; }
exit "$status"
