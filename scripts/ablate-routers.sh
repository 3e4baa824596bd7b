#!/usr/bin/env bash
# Router ablation: trains the same model with each router variant for N seeds and
# tabulates validation loss / bits per byte, throughput, expert-load balance and size.
#
# Usage: scripts/ablate-routers.sh [cpu|gpu] [--seeds N] [--steps S]
#   cpu: configs/tiny-cpu.yaml; gpu: configs/small-gpu.yaml with train.device=cuda.
#   Variants: topk (Switch balance), rmoe, rmoe-detach (router.rmoe_detach=true), ot,
#   topk-auxfree (balance aux_free). Seeds are 1..N (train.seed); --steps overrides
#   train.steps (default: the config's).
# Output: runs/ablate-routers/<variant>-s<seed>/ (checkpoint dir: metrics.jsonl and
# train.log), runs/ablate-routers/results.md and the overlaid validation curves
# (scripts/plot-run.py). A variant that fails (e.g. a router the model does not wire
# yet) is reported and the others continue; the script exits 1 if any run failed.
set -u
cd "$(dirname "$0")/.."

mode=cpu seeds=3 steps=""
while [ $# -gt 0 ]; do
    case "$1" in
        cpu|gpu) mode=$1 ;;
        --seeds) seeds=${2:?--seeds needs a number}; shift ;;
        --steps) steps=${2:?--steps needs a number}; shift ;;
        *) echo "usage: $0 [cpu|gpu] [--seeds N] [--steps S]" >&2; exit 2 ;;
    esac
    shift
done

moe="${MOE_BIN:-build/moe}"
[ -x "$moe" ] || { echo "ablate-routers: $moe not found; build first (scripts/build.sh)" >&2; exit 1; }
if [ "$mode" = gpu ]; then
    config=configs/small-gpu.yaml base=(--set train.device=cuda)
    MOE_BIN="$moe" scripts/prepare-brown-bpe.sh || exit 1 # small-gpu.yaml trains on BPE tokens
else
    config=configs/tiny-cpu.yaml base=()
fi
[ -n "$steps" ] && base+=(--set "train.steps=$steps")
out=runs/ablate-routers
mkdir -p "$out"

variants=(topk rmoe rmoe-detach ot topk-auxfree)
variant_args() {
    case "$1" in
        topk) echo "--set router.type=topk --set router.balance=switch" ;;
        rmoe) echo "--set router.type=rmoe --set router.balance=switch" ;;
        rmoe-detach) echo "--set router.type=rmoe --set router.balance=switch --set router.rmoe_detach=true" ;;
        ot) echo "--set router.type=ot --set router.balance=switch" ;;
        topk-auxfree) echo "--set router.type=topk --set router.balance=aux_free" ;;
    esac
}

failed=() dirs=()
for v in "${variants[@]}"; do
    for ((s = 1; s <= seeds; s++)); do
        dir="$out/$v-s$s"
        rm -rf "$dir"
        mkdir -p "$dir"
        echo "== $v seed $s -> $dir" >&2
        # shellcheck disable=SC2046
        if "$moe" train "$config" "${base[@]}" $(variant_args "$v") --set "train.seed=$s" \
            --set "checkpoint.dir=$dir" >"$dir/train.log" 2>&1; then
            dirs+=("$dir")
        else
            echo "ablate-routers: $v seed $s FAILED (exit $?); last lines of $dir/train.log:" >&2
            tail -n 3 "$dir/train.log" | sed 's/^/    /' >&2
            failed+=("$v-s$s")
        fi
    done
done

/usr/bin/python3 - "$out" "$seeds" "${variants[@]}" <<'PY'
import json, math, os, re, sys

out, seeds, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def mean_std(xs):
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f}"

def load_cv(metrics):
    """Mean over MoE layers of the CV (population std / mean) of the last logged expert shares."""
    last = None
    with open(metrics) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("expert_load"):
                last = rec["expert_load"]
    if not last:
        return None
    cvs = []
    for shares in last:
        m = sum(shares) / len(shares)
        sd = math.sqrt(sum((x - m) ** 2 for x in shares) / len(shares))
        cvs.append(sd / m if m > 0 else 0.0)
    return sum(cvs) / len(cvs)

rows = []
for v in variants:
    vl, vb, tps, cv, params, ok = [], [], [], [], set(), 0
    for s in range(1, seeds + 1):
        d = os.path.join(out, f"{v}-s{s}")
        log = os.path.join(d, "train.log")
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        m = re.search(r"model: ([0-9.]+M) parameters", text)
        if m:
            params.add(m.group(1))
        m = re.search(r"trained \d+ steps: .*?val_loss ([-0-9.naif]+), val_bpb ([-0-9.naif]+).*?([0-9.]+) tokens/s", text)
        if not m:
            continue
        ok += 1
        vl.append(float(m.group(1)))
        vb.append(float(m.group(2)))
        tps.append(float(m.group(3)))
        mp = os.path.join(d, "metrics.jsonl")
        c = load_cv(mp) if os.path.exists(mp) else None
        if c is not None:
            cv.append(c)
    rows.append((v, f"{ok}/{seeds}", mean_std(vl), mean_std(vb), f"{sum(tps) / len(tps):.0f}" if tps else "n/a",
                 mean_std(cv), ", ".join(sorted(params)) or "n/a"))

with open(os.path.join(out, "results.md"), "w") as f:
    f.write("# Router ablation\n\n")
    f.write("val_loss / val_bpb / expert-load CV: mean ± std over the seeds that finished; tokens/s: mean.\n")
    f.write("Expert-load CV: per MoE layer, std/mean of the expert token shares at the last logged step,\n"
            "averaged over layers. Parameters: from the train log; RMoE adds the shared GRU (6 p×p + 6 p)\n"
            "and per layer P_i (d×p) and G_i (p×E) in place of W_g (d×E), so it is not parameter-matched.\n\n")
    f.write("| variant | runs ok | val_loss | val_bpb | tokens/s | expert-load CV | parameters |\n")
    f.write("|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write("| " + " | ".join(r) + " |\n")
print(os.path.join(out, "results.md"))
PY

if [ ${#dirs[@]} -gt 0 ]; then
    /usr/bin/python3 scripts/plot-run.py "${dirs[@]}" --out "$out/" || echo "ablate-routers: plotting failed" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "ablate-routers: failed runs: ${failed[*]}" >&2
    exit 1
fi
