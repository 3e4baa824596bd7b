#!/usr/bin/env bash
# The offload figures: a model with learned routing (>= 32 experts per layer, trained on the
# Brown corpus), its routing-path predictor, and the expert-cache policy sweep of
# `moe bench offload` beside transformers + accelerate, in one call.
#
# Usage: scripts/bench-offload.sh [--quick] [--device cuda|cpu] [--checkpoint CKPT | --train]
#                                 [--model HUBDIR [--make olmoe-1b-7b|small]] [--hub-predictor]
#   --device      where the model runs (default: cuda when nvidia-smi sees a GPU, else cpu)
#   --train       (the default without --checkpoint / --model) train the learned model:
#                 configs/offload-brown-gpu.yaml on cuda (about 3 minutes on one H100,
#                 stopped by SIGTERM after TRAIN_SECONDS, which saves a checkpoint),
#                 configs/offload-tiny-cpu.yaml with --quick or on the cpu
#   --checkpoint  take this checkpoint instead of training one
#   --model       also (alone: only) a hub folder, e.g. from scripts/make-hub-model.py: the
#                 same sweep; no predictor unless --hub-predictor (random weights route by a
#                 fixed random function of the token, so a predictor's gain there says
#                 nothing about learned routing: the trained model is where predict is
#                 measured); --make writes a random-weight one there first
#                 (scripts/make-hub-model.py, torch) unless it already has config.json
#   --quick       tiny sizes: the tiny config, short traces, few predictor steps, 16 tokens
#   --report      run nothing: write table.md and runs.csv again from $BENCH_OUT's logs
# What it does, per model: `moe convert --to-hf` (a hub folder for the reference) and back
# (a checkpoint without optimizer state, quicker to load); `moe trace` of training text and
# of held-out text (data/brown/val.bin); `moe predictor train` on the first, `predictor
# eval` on the second (held-out recall); then `moe bench offload` at budgets of 25% and 50%
# of the expert bytes (--budget-fraction: what the run needs beside the experts plus that
# share of them) with policies lru, lfu, predict, lookahead, predict+lookahead, auto (with the
# predictor), cpu, and resident (every expert, fraction 1), at batch 1 and 8, each with
# --verbose; and
# scripts/bench_offload_reference.py on the hub folder with the same budget in bytes.
# PCIe bound: tokens/s <= H2D rate / ((1 - hit rate) x expert bytes per token), counting
# the misses that were copied (misses computed from the host copy move no expert); H2D
# rate: the one the bench measured at start-up; fraction: achieved / bound.
# Peak GPU memory: nvidia-smi's memory.used sampled every 50 ms during each run, less the
# idle value (includes the CUDA context; the same for the reference).
# Output under $BENCH_OUT (default bench-results/<date>-offload/): table.md, runs.csv,
# predictor-<model>.txt, logs/ (every command's output), work/ (checkpoints, traces); when
# $OUT names a folder (a remote run's), offload-table.md and bench-offload.tgz (all but work/).
# Environment: MOE_BIN (default build-gpu/moe on cuda when present, else build/moe; built
# when missing), PYTHON (the reference's python, default python3), TRAIN_SECONDS (cap on
# training, default 170), RUN_TIMEOUT (cap per bench run, default 150 s), GPU (index, 0),
# TOKENS and PROMPT (decode steps and prompt length of each bench run; default 64, --quick 16);
# PREDICTOR_ARGS (more `moe predictor train` flags, e.g. "--context 16 --hidden 256");
# FRACTIONS, BATCHES, POLICIES (space-separated; defaults "0.25 0.5", "1 8", "lru lfu predict
# lookahead predict+lookahead auto cpu": resident always runs; lookahead = policy predict with
# --lookahead and no predictor, P+lookahead = policy P with --lookahead), REFERENCE=0 (no
# transformers + accelerate runs): a 7B hub folder loads for every run, so its sweep fits a
# 10-minute call only in parts.
# Exit status: 0 when every step ran (a policy the run refuses is a table row,
# not a failure), 1 when a step failed, 2 on bad arguments, 143 when stopped by TERM or INT
# (a time limit: table.md then holds the runs that finished).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

usage() { sed -n '2,/^# Exit status/p' "$root/scripts/bench-offload.sh" | sed 's/^# \{0,1\}//'; }
die() { echo "bench-offload: $*" >&2; exit 2; }

quick=0 device="" ckpt="" train=0 hub="" make="" hub_predictor=0 report=0 args_text="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --device) device=${2:-}; shift ;;
    --checkpoint) ckpt=${2:-}; [ -n "$ckpt" ] || die "--checkpoint needs a file"; shift ;;
    --train) train=1 ;;
    --model) hub=${2:-}; [ -n "$hub" ] || die "--model needs a folder"; shift ;;
    --make) make=${2:-}; case "$make" in olmoe-1b-7b|small) ;; *) die "--make olmoe-1b-7b or small" ;; esac; shift ;;
    --hub-predictor) hub_predictor=1 ;;
    --report) report=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench-offload: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[ -z "$ckpt" ] || [ "$train" = 0 ] || die "give --checkpoint or --train, not both"
[ -n "$ckpt" ] || [ -n "$hub" ] || train=1
[ -z "$ckpt" ] || [ -f "$ckpt" ] || die "--checkpoint $ckpt: no such file"
[ -z "$make" ] || [ -n "$hub" ] || die "--make goes with --model DIR (where to write it)"
[ -z "$hub" ] || [ -n "$make" ] || [ -f "$hub/config.json" ] || die "--model $hub: no config.json there"
if [ -z "$device" ]; then
  if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then device=cuda; else device=cpu; fi
fi
case "$device" in cuda|cpu) ;; *) die "--device is cuda or cpu" ;; esac

# Sizes.
if [ "$quick" = 1 ] || [ "$device" = cpu ]; then config=configs/offload-tiny-cpu.yaml; else config=configs/offload-brown-gpu.yaml; fi
if [ "$quick" = 1 ]; then
  trace_tokens=8192 heldout_tokens=4096 pred_steps=300 tokens=16 prompt=16
else
  trace_tokens=32768 heldout_tokens=8192 pred_steps=2000 tokens=64 prompt=64
fi
tokens=${TOKENS:-$tokens} prompt=${PROMPT:-$prompt}
read -r -a fractions <<<"${FRACTIONS:-0.25 0.5}"
read -r -a batches <<<"${BATCHES:-1 8}"
read -r -a policies <<<"${POLICIES:-lru lfu predict lookahead predict+lookahead auto cpu}"
reference=${REFERENCE:-1}
train_seconds=${TRAIN_SECONDS:-170}
run_timeout=${RUN_TIMEOUT:-150}
gpu=${GPU:-0}
if [ "$device" = cuda ]; then dtype=bf16; else dtype=f32; fi
dev_args=(--device "$device" --dtype "$dtype")

out=${BENCH_OUT:-bench-results/$(date -u +%Y-%m-%d)-offload}
mkdir -p "$out/logs" "$out/work" || exit 1
out=$(cd "$out" && pwd)
logs=$out/logs work=$out/work
py=${PYTHON:-python3}
failed=0
step_fail() { echo "bench-offload: $*" >&2; failed=1; }
say() { echo "== $*" >&2; }

# table.md and runs.csv from runs.index, models.txt, setup.txt and the logs.
write_table() {
  say "table: $out/table.md"
  "$py" - "$out" <<'PY'
import csv, os, re, sys
out = sys.argv[1]
setup = open(os.path.join(out, "setup.txt")).read()
device = re.search(r"^device: (\S+)", setup, re.M).group(1)
tokens = int(re.search(r"--tokens (\d+)", setup).group(1))

def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""

def peak_mib(log):
    vals = [int(v) for v in re.findall(r"^\s*(\d+)\s*$", read(log + ".mem"), re.M)]
    if not vals:
        return None
    idle = int(re.search(r"idle memory.used (\d+) MiB", read(os.path.join(out, "setup.txt"))).group(1))
    return max(vals) - idle

def parse(model, frac, batch, policy, rc, log):
    r = dict(model=model, fraction=frac, batch=int(batch), policy=policy, rc=rc, log=log, note="")
    if rc == "skip":
        r["note"] = "no predictor"
        return r
    text = read(log)
    m = re.search(r"^OFFLOAD (.*)$", text, re.M)
    if m:
        r.update({k: v for k, v in (kv.split("=", 1) for kv in m.group(1).split()) if k not in r})
    if not m or r.get("tokens_per_s") == "NA":
        err = re.search(r"error[^:]*: (.*)", text) or re.search(r"reason=(\S+)", text)
        r["note"] = (err.group(1) if err else "exit %s" % rc).replace("|", "/")[:160]
    g = lambda pat, t=float: (lambda mm: t(mm.group(1)) if mm else None)(re.search(pat, text, re.M))  # noqa: E731
    r["rate"] = g(r"host-to-device copy ([0-9.]+) GB/s \(measured at start-up\)")
    r["slot_bytes"] = g(r"expert slots of (\d+) bytes \(expert bytes", int)
    r["expert_bytes"] = g(r"\(expert bytes (\d+)\)", int)
    r["experts"] = g(r"of (\d+) expert slots of", int)
    r["uses"] = g(r"^offload: total uses (\d+)", int)
    r["misses"] = g(r"^offload: total .* misses (\d+)", int)
    r["host"] = g(r"^offload: total .* \(host (\d+)\)", int)
    r["late"] = g(r"^offload: total .* \(late (\d+)\)", int)
    r["wasted"] = g(r"^offload: total .* wasted (\d+)", int)
    r["waited_ms"] = g(r"^offload: total .* waited ([0-9.]+) ms", float)
    r["predictor_ms"] = g(r"^offload: host-to-device .* predictor ([0-9.]+) ms", float)
    r["peak_mib"] = peak_mib(log)
    return r

rows = []
for ln in read(os.path.join(out, "runs.index")).splitlines():
    rows.append(parse(*ln.split()))

def num(r, k):
    try:
        return float(r[k])
    except (KeyError, TypeError, ValueError):
        return None

for r in rows:  # the PCIe bound: H2D rate / ((1 - hit rate) x expert bytes per token), copied misses only
    tps, made = num(r, "tokens_per_s"), r["batch"] * tokens
    r["bound"] = r["bound_fraction"] = None
    if tps is not None and r.get("rate") and r.get("slot_bytes") and r.get("misses") is not None:
        copied = r["misses"] - (r.get("host") or 0)
        if copied > 0:
            r["bound"] = r["rate"] * 1e9 * made / (copied * r["slot_bytes"])
            r["bound_fraction"] = tps / r["bound"]

fields = ["model", "fraction", "batch", "policy", "budget", "tokens_per_s", "hit_rate", "bytes_per_token", "ttft_ms",
          "peak_mib", "rate", "uses", "misses", "host", "late", "wasted", "waited_ms", "predictor_ms", "slot_bytes", "expert_bytes", "bound", "bound_fraction",
          "peak_bytes", "gpu_layers", "rc", "note", "log"]
with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})

def fmt(v, spec):
    return "—" if v is None else format(v, spec)

def mib(b):
    return "—" if b is None else "%.1f" % (b / 2 ** 20)

def size(b):
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= scale:
            return "%.2f %s" % (b / scale, unit)
    return "%d bytes" % b

lines = ["# Offloaded decoding: expert-cache policies", "", "```"] + read(os.path.join(out, "setup.txt")).splitlines() + ["```", ""]
lines += ["Columns: decode tokens/s (batch x tokens over the decode steps, prefill apart); x lru: against lru at the",
          "same budget and batch; hit rate of the expert cache over the decode steps; H2D bytes per generated token",
          "(misses and prefetches copied); TTFT: the prompt's forward; peak GPU MiB: nvidia-smi memory.used above idle",
          "(CUDA context included); PCIe bound: H2D rate at start-up / ((1 - hit rate) x expert bytes per token), the",
          "misses computed from the host copy left out (none copied: no bound); of bound: tokens/s over it; of",
          "min(bound, resident): over the lower of the bound and the resident speed at the same batch (the bound",
          "counts copies only, so a model whose step is compute-bound cannot reach it).",
          "Host per decode step: ms the host blocked on copies (a copy still running when its expert was needed",
          "or evicted) and ms in the predictor; late: hits that waited on a copy in flight; wasted: prefetched",
          "experts evicted before any use (counts over the decode steps).",
          "resident holds every expert (its budget: fraction 1). The reference (transformers + accelerate,",
          "device_map=auto) gets the lru budget in bytes as its GPU max_memory, which caps its weights only.", ""]
models = {}
for ln in read(os.path.join(out, "models.txt")).splitlines():
    name, *rest = ln.split()
    models[name] = rest
for name in models:
    mr = [r for r in rows if r["model"] == name]
    if not mr:
        continue
    any_r = next((r for r in mr if r.get("expert_bytes")), {})
    lines += ["## %s: %s" % (name, models[name][0]), ""]
    if any_r:
        lines.append("Experts: %d routed, %s each, %s in all (%s)." % (
            any_r["experts"], size(any_r["slot_bytes"]), size(any_r["expert_bytes"]),
            "bf16" if device == "cuda" else "f32"))
    if name == "trained" and read(os.path.join(out, "train-summary.txt")):
        lines.append("Training (the last progress and evaluation lines): " +
                     "; ".join(read(os.path.join(out, "train-summary.txt")).splitlines()) + ".")
    ptxt = read(os.path.join(out, "predictor-%s.txt" % name))
    means = re.findall(r"^mean\s+(.*)$", ptxt, re.M)
    if len(means) >= 2:
        tr, ev = means[0].split(), means[1].split()
        lines.append("Predictor: held-out top-k recall %s (traced held-out text; on the last 10%% of the training "
                     "traces %s, token-identity baseline %s, chance %s)." % (ev[0], tr[0], tr[1], tr[2]))
        t = re.search(r"^time: (.*)$", ptxt, re.M)
        if t:
            lines.append("Prediction time: " + t.group(1) + ".")
    elif name == "hub":
        lines.append("Predictor: none (random weights; --hub-predictor trains one on its traces).")
    lines.append("")
    fracs = sorted({r["fraction"] for r in mr if r["policy"] != "resident"}, key=float)
    for b in sorted({r["batch"] for r in mr}):
        res = next((r for r in mr if r["batch"] == b and r["policy"] == "resident"), None)
        for frac in fracs:
            sel = [r for r in mr if r["batch"] == b and r["fraction"] == frac]
            lru = next((num(r, "tokens_per_s") for r in sel if r["policy"] == "lru"), None)
            budget = next((r.get("budget") for r in sel if r["policy"] == "lru" and r.get("budget")), None)
            lines += ["### %s, budget %s%% of the expert bytes (%s MiB in all), batch %d" % (
                name, fmt(float(frac) * 100, ".0f"), mib(float(budget)) if budget else "?", b), "",
                "| policy | tokens/s | x lru | hit rate | H2D bytes/token | TTFT ms | peak GPU MiB | PCIe bound tok/s | of bound "
                "| of min(bound, resident) | host waits ms/step | predictor ms/step | late, wasted | note |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
            res_tps = num(res, "tokens_per_s") if res else None
            for r in ([res] if res else []) + sel:
                tps = num(r, "tokens_per_s")
                ratio = tps / lru if tps is not None and lru else None
                bpt = num(r, "bytes_per_token")
                pol = r["policy"] + (" (all experts)" if r["policy"] == "resident" else "")
                per_step = lambda k: r[k] / tokens if r.get(k) is not None else None  # noqa: E731
                lw = "%d, %d" % (r["late"], r["wasted"]) if r.get("late") is not None and r.get("wasted") is not None else "—"
                ceiling = min(r["bound"], res_tps) if r["bound"] and res_tps else None
                lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    pol, fmt(tps, ".1f"), fmt(ratio, ".2f"), fmt(num(r, "hit_rate"), ".3f"), fmt(bpt, ".0f"),
                    fmt(num(r, "ttft_ms"), ".1f"), fmt(r.get("peak_mib"), "d"), fmt(r["bound"], ".0f"),
                    fmt(r["bound_fraction"], ".2f"), fmt(tps / ceiling if tps is not None and ceiling else None, ".2f"),
                    fmt(per_step("waited_ms"), ".3f"),
                    fmt(per_step("predictor_ms"), ".3f"), lw, r["note"]))
            lines.append("")
with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
}

[ "$report" = 0 ] || { write_table; exit $?; }

# The table of the runs so far, and (for a run whose results are fetched from $OUT) the table
# beside one archive of everything but work/. Also on TERM or INT (a time limit): the run
# in progress is stopped, what ran is kept, and the exit status is 143.
finish() {
  write_table || step_fail "the table failed"
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    cp "$out/table.md" "$OUT/offload-table.md" 2>/dev/null
    tar czf "$OUT/bench-offload.tgz" -C "$out" --exclude=./work . 2>/dev/null || step_fail "could not pack into $OUT"
  fi
}
child=""
on_signal() {
  trap - TERM INT
  [ -z "$child" ] || kill "$child" 2>/dev/null
  echo "bench-offload: stopped by a signal; the table holds the runs that finished" >&2
  finish
  exit 143
}
trap on_signal TERM INT

# The GPU machine's libraries (scripts/gpu-prepare.sh), when carried along.
if [ -f .devdeps/prelude.sh ]; then
  set +u
  # shellcheck disable=SC1091
  source .devdeps/prelude.sh
  set -u
fi
export NCCL_NVLS_ENABLE=0

# The program: built when missing or older than --budget-fraction (the moe target only).
has_flag() { [ -x "$1" ] && "$1" bench offload --help 2>&1 | grep -q -- --budget-fraction; }
build_moe() { # build-folder cmake-options...
  local dir=$1; shift
  say "building $dir/moe (cmake $*, the moe target)"
  { cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@" && cmake --build "$dir" --target moe -j"$(nproc)"; } \
    >"$logs/build.log" 2>&1 || { tail -20 "$logs/build.log" >&2; die "the build failed ($logs/build.log)"; }
}
if [ -n "${MOE_BIN:-}" ]; then
  moe=$MOE_BIN
elif [ "$device" = cuda ]; then
  moe=build-gpu/moe
  has_flag "$moe" || build_moe build-gpu -DMOE_CUDA=ON
else
  moe=build/moe
  has_flag "$moe" || build_moe build
fi
[ -x "$moe" ] || die "$moe is not an executable"
moe=$(cd "$(dirname "$moe")" && pwd)/$(basename "$moe")
has_flag "$moe" || die "$moe has no 'bench offload --budget-fraction' (an older build?)"

# GPU memory: nvidia-smi's memory.used (MiB) sampled while a command runs.
smi=0
if [ "$device" = cuda ] && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" >/dev/null 2>&1; then smi=1; fi
idle_mib=0
[ "$smi" = 0 ] || idle_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" | head -1)
measured() { # log command...: the command's output into log; log.mem the memory samples
  local log=$1; shift
  local sampler=""
  if [ "$smi" = 1 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" -lms 50 >"$log.mem" 2>/dev/null &
    sampler=$!
  fi
  timeout -s TERM "$run_timeout" "$@" >"$log" 2>&1 &
  child=$! # waited for in the background, so that a TERM to this script is handled at once
  wait "$child"
  local rc=$?
  child=""
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; fi
  return $rc
}

{
  echo "date: $(date -u -Is)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
  echo "command: scripts/bench-offload.sh $args_text"
  echo "device: $device ($dtype); cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  [ "$smi" = 0 ] || echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader -i "$gpu"), idle memory.used ${idle_mib} MiB"
  "$moe" --version 2>&1 | head -3 | sed 's/^/moe: /'
  echo "sizes: config $config, traces $trace_tokens + $heldout_tokens held-out tokens, predictor $pred_steps steps" \
    "${PREDICTOR_ARGS:+($PREDICTOR_ARGS)}, bench --prompt $prompt --tokens $tokens"
} >"$out/setup.txt"
cat "$out/setup.txt" >&2

# ---- data: byte tokens of Brown (as scripts/ablate.sh) ----
prepare_data() {
  [ -s data/brown/train.bin ] && [ -s data/brown/val.bin ] && return 0
  say "preparing data/brown (scripts/get-brown.sh, moe data prepare)"
  scripts/get-brown.sh data/brown >"$logs/data.log" 2>&1 &&
    "$moe" data prepare --out data/brown data/brown/brown.txt >>"$logs/data.log" 2>&1 ||
    { tail -5 "$logs/data.log" >&2; echo "bench-offload: no data/brown/train.bin and val.bin: on a machine without" \
      "network, make them beforehand (scripts/get-brown.sh; moe data prepare --out data/brown data/brown/brown.txt)" \
      "and take data/brown along" >&2; exit 1; }
}

# ---- the learned model ----
train_model() { # -> $ckpt
  local run=$work/run
  say "training $config on $device for at most ${train_seconds}s ($run)"
  local t0=$SECONDS rc
  timeout -s TERM "$train_seconds" "$moe" train "$config" --overwrite --set checkpoint.dir="$run" \
    --set train.device="$device" --set train.dtype="$dtype" >"$logs/train.log" 2>&1
  rc=$?
  ckpt=$(ls -1 "$run"/ckpt-*.h5 2>/dev/null | sort | tail -1)
  if { [ $rc -ne 0 ] && [ $rc -ne 124 ]; } || [ -z "$ckpt" ]; then # 124: timeout stopped it (SIGTERM, saved)
    tail -5 "$logs/train.log" >&2; echo "bench-offload: training failed (exit $rc)" >&2; exit 1
  fi
  [ $rc -eq 0 ] || echo "   stopped at the time cap (SIGTERM saved $ckpt)" >&2
  { grep -E '^ *step ' "$logs/train.log" | tail -1 | tr -s ' '
    grep -E 'val_bpb' "$logs/train.log" | tail -1 | sed 's/^ *//'
    echo "wall time $((SECONDS - t0)) s (cap ${train_seconds} s), checkpoint $(basename "$ckpt")"
  } >"$out/train-summary.txt"
  sed 's/^/   /' "$out/train-summary.txt" >&2
}

# A checkpoint without optimizer state and a hub folder (for the reference): -> $lean, $ckpt_hub
export_model() { # ckpt name
  local src=$1 name=$2
  lean=$src ckpt_hub=""
  rm -rf "${work:?}/$name-hub"
  if "$moe" convert "$src" --to-hf "$work/$name-hub" >"$logs/$name-export.log" 2>&1; then
    ckpt_hub=$work/$name-hub
    if "$moe" convert "$ckpt_hub" --out "$work/$name.h5" >>"$logs/$name-export.log" 2>&1; then lean=$work/$name.h5
    else echo "   convert back failed: the sweep loads $src ($logs/$name-export.log)" >&2; fi
  else
    echo "   no hub form (moe convert --to-hf: $(grep -m1 error "$logs/$name-export.log")): no reference row" >&2
  fi
}

# Traces, predictor, held-out recall: -> $pred (empty when it failed)
train_predictor() { # name text heldout source-args...
  local name=$1 text=$2 heldout=$3; shift 3
  pred=""
  say "$name: traces ($trace_tokens tokens of $text, $heldout_tokens of $heldout), predictor ($pred_steps steps)"
  local f=$out/predictor-$name.txt
  "$moe" trace "$@" "${dev_args[@]}" --data "$text" --out "$work/$name-traces.h5" --tokens "$trace_tokens" \
    >"$logs/$name-trace.log" 2>&1 &&
    "$moe" trace "$@" "${dev_args[@]}" --data "$heldout" --out "$work/$name-heldout.h5" --tokens "$heldout_tokens" \
      >>"$logs/$name-trace.log" 2>&1 || { step_fail "$name: moe trace failed ($logs/$name-trace.log)"; return; }
  { echo "## moe predictor train (recall on the last 10% of the traced training text)"
    "$moe" predictor train "$work/$name-traces.h5" --out "$work/$name-predictor.h5" --steps "$pred_steps" --log-every 0 \
      ${PREDICTOR_ARGS:-}
  } >"$f" 2>&1 || { step_fail "$name: predictor train failed ($f)"; return; }
  { echo; echo "## moe predictor eval (held-out text)"
    "$moe" predictor eval "$work/$name-heldout.h5" --predictor "$work/$name-predictor.h5"
  } >>"$f" 2>&1 || { step_fail "$name: predictor eval failed ($f)"; return; }
  pred=$work/$name-predictor.h5
  grep -E '^(mean|time:)' "$f" | sed 's/^/   /' >&2
}

# On a small shared CPU, OpenMP threads waiting for each other swamp the tiny model's times.
[ "$quick" = 0 ] || [ "$device" = cuda ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# One bench run; a line of runs.index: model fraction batch policy rc log
bench_one() { # name fraction batch policy predictor source-args...
  local name=$1 frac=$2 b=$3 policy=$4 p=$5; shift 5
  local log=$logs/$name-f$frac-b$b-$policy.log extra=() flag=$policy
  case "$policy" in # lookahead: predict on the next layers' routers alone; P+lookahead: policy P with it
    lookahead) flag=predict extra=(--lookahead) ;;
    *+lookahead) flag=${policy%+lookahead} extra=(--lookahead) ;;
  esac
  [ -z "$p" ] || extra+=(--predictor "$p")
  measured "$log" "$moe" bench offload "$@" "${dev_args[@]}" --budget-fraction "$frac" --policy "$flag" \
    "${extra[@]}" --batch "$b" --tokens "$tokens" --prompt "$prompt" --verbose
  local rc=$?
  echo "$name $frac $b $policy $rc $log" >>"$out/runs.index"
  local line
  line=$(grep -m1 '^OFFLOAD' "$log" | cut -d' ' -f2-)
  [ -n "$line" ] && echo "   $line" >&2 || echo "   $policy f=$frac batch=$b: exit $rc: $(grep -m1 'error' "$log")" >&2
}

sweep() { # name predictor hubdir source-args...
  local name=$1 p=$2 hubdir=$3; shift 3
  say "$name: moe bench offload sweep (budgets ${fractions[*]} of the expert bytes, batch ${batches[*]})"
  for b in "${batches[@]}"; do
    bench_one "$name" 1 "$b" resident "" "$@"
    for frac in "${fractions[@]}"; do
      for policy in "${policies[@]}"; do
        case "$policy" in
          predict | predict+lookahead)
                   if [ -z "$p" ]; then echo "$name $frac $b $policy skip -" >>"$out/runs.index"; continue; fi
                   bench_one "$name" "$frac" "$b" "$policy" "$p" "$@" ;;
          auto | auto+lookahead) bench_one "$name" "$frac" "$b" "$policy" "$p" "$@" ;;
          *) bench_one "$name" "$frac" "$b" "$policy" "" "$@" ;;
        esac
      done
    done
  done
  [ -n "$hubdir" ] && [ "$reference" != 0 ] || return 0
  say "$name: transformers + accelerate ($py scripts/bench_offload_reference.py), the same budgets in bytes"
  for b in "${batches[@]}"; do
    for frac in "${fractions[@]}"; do
      local budget log=$logs/$name-f$frac-b$b-reference.log
      budget=$(sed -n 's/^OFFLOAD .* budget=\([0-9]*\) .*/\1/p' "$logs/$name-f$frac-b$b-lru.log" 2>/dev/null | head -1)
      [ -n "$budget" ] || { echo "   f=$frac batch=$b: no lru budget to match; skipped" >&2; continue; }
      measured "$log" "$py" scripts/bench_offload_reference.py "$hubdir" --max-gpu-memory "$budget" --batch "$b" \
        --tokens "$tokens" --prompt "$prompt"
      local rc=$?
      echo "$name $frac $b transformers-accelerate $rc $log" >>"$out/runs.index"
      echo "   $(grep -m1 '^OFFLOAD' "$log" | cut -d' ' -f2- || true)" >&2
      [ $rc -eq 0 ] || step_fail "$name: the reference failed at f=$frac batch=$b ($log)"
    done
  done
}

: >"$out/runs.index"
: >"$out/models.txt"
rm -f "$out/train-summary.txt" "$out"/predictor-*.txt
if [ "$train" = 1 ] || [ -n "$ckpt" ]; then
  prepare_data
  [ -n "$ckpt" ] || train_model
  export_model "$ckpt" trained
  echo "trained $ckpt $lean ${ckpt_hub:--}" >>"$out/models.txt"
  train_predictor trained data/brown/train.bin data/brown/val.bin --checkpoint "$lean"
  sweep trained "$pred" "$ckpt_hub" --checkpoint "$lean"
fi
if [ -n "$hub" ] && [ -n "$make" ] && [ ! -f "$hub/config.json" ]; then
  say "making $hub ($py scripts/make-hub-model.py --shape $make)"
  "$py" scripts/make-hub-model.py "$hub" --shape "$make" >"$logs/make-hub-model.log" 2>&1 ||
    { tail -5 "$logs/make-hub-model.log" >&2; step_fail "make-hub-model.py failed"; hub=""; }
fi
if [ -n "$hub" ]; then
  hub=$(cd "$hub" && pwd)
  echo "hub $hub" >>"$out/models.txt"
  pred=""
  if [ "$hub_predictor" = 1 ]; then
    prepare_data
    text=data/brown/train.bin heldout=data/brown/val.bin
    if [ -f "$hub/tokenizer.json" ]; then # text through its tokenizer: the head, and the tail held out
      text=data/brown/brown.txt heldout=$work/brown-tail.txt
      tail -c 300000 data/brown/brown.txt >"$heldout"
    fi
    train_predictor hub "$text" "$heldout" --model "$hub"
  fi
  sweep hub "$pred" "$hub" --model "$hub"
fi

finish
exit $failed
