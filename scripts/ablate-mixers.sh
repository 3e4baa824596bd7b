#!/usr/bin/env bash
# Token-mixer ablation (ALGORITHMS.md §3): trains the same model with four mixers and
# compares validation loss / bits per byte, speed and size.
#   attention  model.mixer=attention
#   mom        model.mixer=mom           (mixture of memories, model.mom_* defaults)
#   gdn        model.mixer=gdn           (single-memory gated delta net)
#   hybrid     model.mixer=[attention,mom,attention,mom], model.n_layers=4
# Usage: scripts/ablate-mixers.sh [cpu|gpu] [--seeds N] [--steps S] [--set key=value ...]
#   cpu: configs/tiny-cpu.yaml (default), gpu: configs/small-gpu.yaml.
# Each run goes to runs/ablate-mixers/<variant>-s<seed> (its log beside it as .log); a
# variant that fails (e.g. a mixer this build lacks) is reported and the others go on.
# Writes runs/ablate-mixers/results.md (mean ± std over seeds) and the comparison plot
# of scripts/plot-run.py.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

target=cpu
seeds=2
steps=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|gpu) target="$1" ;;
    --seeds) seeds="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --set) extra+=(--set "$2"); shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "ablate-mixers: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$target" in
  cpu) config=configs/tiny-cpu.yaml ;;
  gpu) config=configs/small-gpu.yaml ;; # BPE data: scripts/prepare-brown-bpe.sh (run below)
esac
[[ "$seeds" =~ ^[1-9][0-9]*$ ]] || { echo "ablate-mixers: --seeds must be a positive integer" >&2; exit 2; }
[ -z "$steps" ] || [[ "$steps" =~ ^[1-9][0-9]*$ ]] || { echo "ablate-mixers: --steps must be a positive integer" >&2; exit 2; }

moe="${MOE_BIN:-build/moe}"
if [ ! -x "$moe" ]; then
  scripts/build.sh || { echo "ablate-mixers: build failed" >&2; exit 1; }
fi
if [ "$config" = configs/small-gpu.yaml ]; then MOE_BIN="$moe" scripts/prepare-brown-bpe.sh || exit 1; fi
if [ ! -s data/brown/train.bin ]; then
  scripts/get-brown.sh data/brown && "$moe" data prepare --out data/brown data/brown/brown.txt ||
    { echo "ablate-mixers: could not prepare data/brown" >&2; exit 1; }
fi

out=runs/ablate-mixers
mkdir -p "$out"
variants=(attention mom gdn hybrid)
declare -A sets=(
  [attention]="model.mixer=attention"
  [mom]="model.mixer=mom"
  [gdn]="model.mixer=gdn"
  [hybrid]="model.mixer=[attention,mom,attention,mom] model.n_layers=4"
)

failed=()
dirs=()
for v in "${variants[@]}"; do
  for ((s = 1; s <= seeds; s++)); do
    run="$out/$v-s$s"
    rm -rf "$run" "$run.log"
    args=(train "$config" --set checkpoint.dir="$run" --set train.seed=$((1233 + s)))
    for kv in ${sets[$v]}; do args+=(--set "$kv"); done
    [ -n "$steps" ] && args+=(--set train.steps="$steps")
    args+=("${extra[@]}")
    echo "== $v seed $s: $moe ${args[*]}"
    if "$moe" "${args[@]}" >"$run.log" 2>&1; then
      dirs+=("$run")
      grep '^trained' "$run.log" || true
    else
      echo "!! $v seed $s FAILED (exit $?); last lines of $run.log:" >&2
      tail -n 3 "$run.log" >&2
      failed+=("$v-s$s")
    fi
  done
done

# results.md: one row per variant over the seeds that finished.
/usr/bin/python3 - "$out" "$seeds" "${variants[@]}" <<'EOF'
import math, os, re, sys
out, seeds, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def stats(xs):
    if not xs: return "n/a"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f}"
rows = []
for v in variants:
    vl, vb, tps, params, ok = [], [], [], "n/a", 0
    for s in range(1, seeds + 1):
        path = os.path.join(out, f"{v}-s{s}.log")
        if not os.path.exists(path): continue
        text = open(path, errors="replace").read()
        m = re.search(r"^trained .*val_loss ([0-9.naif]+), val_bpb ([0-9.naif]+).*?, ([0-9.]+) tokens/s", text, re.M)
        p = re.search(r"^model: ([0-9.]+M) parameters", text, re.M)
        if p: params = p.group(1)
        if not m: continue
        ok += 1
        vl.append(float(m.group(1))); vb.append(float(m.group(2))); tps.append(float(m.group(3)))
    tp = f"{sum(tps) / len(tps):.0f}" if tps else "n/a"
    rows.append(f"| {v} | {ok}/{seeds} | {stats(vl)} | {stats(vb)} | {tp} | {params} |")
with open(os.path.join(out, "results.md"), "w") as f:
    f.write("# Token-mixer ablation\n\n")
    f.write("| variant | seeds ok | val_loss (mean ± std) | val_bpb (mean ± std) | tokens/s | parameters |\n")
    f.write("|---|---|---|---|---|---|\n")
    f.write("\n".join(rows) + "\n")
print(open(os.path.join(out, "results.md")).read())
EOF

if [ ${#dirs[@]} -gt 0 ]; then
  /usr/bin/python3 scripts/plot-run.py "${dirs[@]}" --out "$out/" || echo "ablate-mixers: plotting failed" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "ablate-mixers: failed runs: ${failed[*]} (see $out/<run>.log)" >&2
  exit 1
fi
