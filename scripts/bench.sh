#!/usr/bin/env bash
# Side-by-side benchmarks of results/README.md: our `moe bench CASE --json`
# against the PyTorch reference scripts/bench_reference.py, same shapes, same machine,
# alternating (the side that goes first swaps every round), several rounds; the median
# over rounds per side. Prints a markdown table and, per figure, exactly one line
#   BENCH <case> ours=<ms> ref=<ms> speedup=<ref/ours> ceiling=<fraction> rounds=<lo-hi>
#         vs_fastest=<the reference's fastest repetition over all rounds / ours>
# where the fwd+bwd (layer) or whole-step (LM) figure carries the bare case name and the
# forward-only figure adds -fwd; rounds = the lowest and highest per-round speedup;
# vs_fastest is the conservative ratio where the reference's times jitter with its host
# (eager PyTorch is host-bound); "ceiling" = our FLOP rate / the matmul rate measured in
# the same run (`moe bench sgemm`: oneDNN f32 n=2048 on the CPU, cuBLAS bf16 8192^3 on
# the GPU), also printed as `CEILING sgemm gflops_per_s=<rate> n=<n>`. NA marks a side
# that failed (its log says why); the exit status is then 1.
#
# Usage: scripts/bench.sh [cpu|gpu] [--reps N] [--warmup W] [--rounds R] [--cases "A B"]
#   cpu (default): moe-layer-cpu, lm-step-cpu; both sides pinned to the same 2 cores
#                  (taskset -c 0,1) with 2 threads each.
#   gpu:           moe-layer-gpu, moe-layer-gpu-fine, lm-train-gpu on the H200. The reference
#                  runs each case with its experts as the transformers loop (lm-train-gpu also
#                  compiled: -vs-compile) and as torch._grouped_mm (--experts grouped_mm),
#                  eager (-vs-grouped) and compiled (-vs-grouped-compile).
# Environment: MOE_BIN (default build/moe; gpu: build-gpu/moe when it exists),
#   PYTHON (the reference's python; falls back to /usr/bin/python3 when it lacks torch),
#   BENCH_OUT (results folder; default bench-results/<date>-<mode>/, git-ignored).
# Raw JSON lines go to ours.jsonl / ref.jsonl there, logs to *.log, the report to report.md.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mode=cpu
reps=10
warmup=3
rounds=3
cases=""
while [ $# -gt 0 ]; do
    case "$1" in
    cpu | gpu) mode=$1 ;;
    --reps) reps=${2:?--reps needs a number}; shift ;;
    --warmup) warmup=${2:?--warmup needs a number}; shift ;;
    --rounds) rounds=${2:?--rounds needs a number}; shift ;;
    --cases) cases=${2:?--cases needs case names}; shift ;;
    -h | --help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$mode" = cpu ]; then
    : "${cases:=moe-layer-cpu lm-step-cpu}"
    moe_bin=${MOE_BIN:-build/moe}
    device=cpu
    export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
    thread_args=(--threads 2)
    pin=()
    if command -v taskset >/dev/null && taskset -c 0,1 true 2>/dev/null; then
        pin=(taskset -c "0,1")
    else
        echo "bench.sh: taskset -c 0,1 is not available here; running unpinned" >&2
    fi
else
    : "${cases:=moe-layer-gpu moe-layer-gpu-fine lm-train-gpu}"
    moe_bin=${MOE_BIN:-build-gpu/moe}
    [ -x "$moe_bin" ] || moe_bin=build/moe
    device=cuda
    thread_args=()
    pin=()
fi
[ -x "$moe_bin" ] || { echo "bench.sh: no moe program at $moe_bin (build it, or set MOE_BIN)" >&2; exit 1; }

py=${PYTHON:-python3}
if ! "$py" -c 'import torch' 2>/dev/null; then
    if /usr/bin/python3 -c 'import torch' 2>/dev/null; then
        echo "bench.sh: $py has no torch; using /usr/bin/python3 for the reference" >&2
        py=/usr/bin/python3
    else
        echo "bench.sh: no python with torch found; the reference side is skipped (ref=NA)" >&2
        py=""
    fi
fi
agg_py=${py:-python3}

out=${BENCH_OUT:-bench-results/$(date +%Y%m%d-%H%M%S)-$mode}
mkdir -p "$out"
: >"$out/ours.jsonl"
: >"$out/ref.jsonl"
: >"$out/ours.log"
: >"$out/ref.log"

run_ours() { # case [extra moe bench args]
    local c=$1; shift
    echo "== round $round: moe bench $c" >>"$out/ours.log"
    "${pin[@]}" "$moe_bin" bench "$c" --json --reps "$reps" --warmup "$warmup" "${thread_args[@]}" "$@" \
        >>"$out/ours.jsonl" 2>>"$out/ours.log" ||
        { echo "bench.sh: ours failed on $c (see $out/ours.log)" >&2; failures=$((failures + 1)); }
}

run_ref() { # case [--compile] [--experts loop|grouped_mm]
    [ -n "$py" ] || return 0
    echo "== round $round: bench_reference.py $*" >>"$out/ref.log"
    "${pin[@]}" "$py" scripts/bench_reference.py "$@" --reps "$reps" --warmup "$warmup" "${thread_args[@]}" \
        >>"$out/ref.jsonl" 2>>"$out/ref.log" ||
        { echo "bench.sh: the reference failed on $* (see $out/ref.log)" >&2; failures=$((failures + 1)); }
}

run_refs() { # case: every reference variant of the case, one after another
    local c=$1 v variants=("")
    # the whole-model GPU step is also compared with torch.compile
    if [ "$c" = lm-train-gpu ]; then variants+=("--compile"); fi
    if [ "$mode" = gpu ]; then variants+=("--experts grouped_mm" "--experts grouped_mm --compile"); fi
    for v in "${variants[@]}"; do
        # shellcheck disable=SC2086 # a variant is a list of flags
        run_ref "$c" $v
    done
}

failures=0
torch_version=$([ -n "$py" ] && "$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)
for round in $(seq 1 "$rounds"); do
    echo "bench.sh: round $round of $rounds ($mode: $cases)" >&2
    run_ours sgemm --device "$device"
    for c in $cases; do
        if [ $((round % 2)) -eq 1 ]; then
            run_ours "$c"
            run_refs "$c"
        else
            run_refs "$c"
            run_ours "$c"
        fi
    done
done

"$agg_py" - "$out" "$mode" "$torch_version" "$cases" "$rounds" <<'PY' | tee "$out/report.md"
import json, os, statistics, sys

out, mode, torch_version, cases, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5]

def load(name):
    recs = {}
    with open(os.path.join(out, name)) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                case = (r["case"] + ("-grouped" if r.get("experts") == "grouped_mm" else "")
                        + ("-compile" if r.get("compile") else ""))
                recs.setdefault((case, r["phase"]), []).append(r)
    return recs

ours, ref = load("ours.jsonl"), load("ref.jsonl")

def med(recs, key):
    return statistics.median(r[key] for r in recs) if recs else None

def fmt(v, spec):
    return "NA" if v is None else format(v, spec)

gemm = ours.get(("sgemm", "gemm"), [])
ceiling_rate = med(gemm, "gflops_per_s")
first = (next(iter(ours.values()), None) or [{}])[0]
print(f"# moe bench, {mode}: ours = moe {first.get('version', '?')}, reference = PyTorch {torch_version}")
print()
print(f"{rounds} round(s); each figure is the median over rounds of per-round medians (speedup per round: "
      f"the lowest and highest of round i's reference over round i's ours); device "
      f"{first.get('device', '?')}, {first.get('threads', '?')} threads.")
if torch_version.startswith("1."):
    print("Reference is PyTorch 1.x (Debian's stand-in): a smoke run, not a reported ratio (results/README.md).")
print()
print("| case | ours ms | ref ms | speedup (ref/ours) | speedup per round | vs ref's fastest rep "
      "| ours ms per round | ref ms per round | ceiling | ours peak MiB | ref peak MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
lines = []
for case in cases:
    base = [("fwd", "-fwd"), ("fwd_bwd", "")] if "layer" in case else [("step", "")]
    phases = []  # (phase, label, reference key): the eager loop always, other variants when run
    for variant in ("", "-compile", "-grouped", "-grouped-compile"):
        for phase, suffix in base:
            if not variant or (case + variant, phase) in ref:
                phases.append((phase, case + suffix + (variant and "-vs" + variant), case + variant))
    for phase, label, ref_case in phases:
        o, r = ours.get((case, phase), []), ref.get((ref_case, phase), [])
        oms, rms = med(o, "ms"), med(r, "ms")
        speedup = rms / oms if oms and rms else None
        ceiling = None
        if oms and ceiling_rate:
            ceiling = o[0]["flops"] / (oms * 1e-3) / 1e9 / ceiling_rate
        opk, rpk = med(o, "peak_bytes"), med(r, "peak_bytes")
        ratios = [b["ms"] / a["ms"] for a, b in zip(o, r) if a["ms"] > 0]  # round i against round i
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "NA"
        # the reference's fastest single repetition over all rounds against our median: the
        # conservative ratio where the reference's times jitter with its host (eager PyTorch)
        fastest = min((t for x in r for t in x.get("ms_all", [x["ms"]])), default=None)
        vs_fastest = fastest / oms if oms and fastest else None
        per_round = lambda recs: ", ".join(format(x["ms"], ".2f") for x in recs) or "NA"  # noqa: E731
        print(f"| {label} | {fmt(oms, '.3f')} | {fmt(rms, '.3f')} | {fmt(speedup, '.2f')} | {spread} | {fmt(vs_fastest, '.2f')} | {per_round(o)} "
              f"| {per_round(r)} | {fmt(ceiling, '.3f')} | {fmt(opk and opk / 2**20, '.1f')} "
              f"| {fmt(rpk and rpk / 2**20, '.1f')} |")
        lines.append(f"BENCH {label} ours={fmt(oms, '.3f')} ref={fmt(rms, '.3f')} speedup={fmt(speedup, '.3f')} "
                     f"ceiling={fmt(ceiling, '.3f')} rounds={spread} vs_fastest={fmt(vs_fastest, '.3f')}")
print()
unit = "GFLOP/s" if mode == "cpu" else "TFLOP/s"
scale = 1 if mode == "cpu" else 1e-3
print(f"Matmul ceiling (moe bench sgemm, n={gemm[0]['n'] if gemm else 'NA'}): "
      f"{fmt(ceiling_rate and ceiling_rate * scale, '.1f')} {unit}. "
      "Peak: ours = PERSIST + STEP arena peaks; ref = peak RSS (cpu) or cuda max allocated.")
print()
for l in lines:
    print(l)
print(f"CEILING sgemm gflops_per_s={fmt(ceiling_rate, '.2f')} n={gemm[0]['n'] if gemm else 'NA'}")
PY
echo "bench.sh: results in $out" >&2
if [ "$failures" -gt 0 ]; then
    echo "bench.sh: $failures run(s) failed (NA in the table); see the logs in $out" >&2
    exit 1
fi
