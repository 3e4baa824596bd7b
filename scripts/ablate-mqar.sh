#!/usr/bin/env bash
# Recall ablation: attention vs the gated delta net (gdn) vs the mixture of memories (mom)
# on multi-query associative recall (MQAR, moe/train/mqar.h), at matched parameters
# (configs/mqar-<mixer>.yaml), over seeds, sequence lengths and numbers of key-value pairs.
# Writes the recall table (mean ± std over seeds per mixer x length x pairs) and a plot.
#
# Usage: scripts/ablate-mqar.sh [cpu|gpu] [--seeds N] [--seq-lens "256 512 1024"]
#                               [--pairs "16 32 64"] [--mixers attention,gdn,mom]
#                               [--steps S] [--jobs J] [--gpus G] [--vocab V] [--train N]
#                               [--set key=value ...] [--report] [--merge "CSV ..."] [--continue]
#                               [--out DIR] [--work DIR]
#   gpu (default): the configs as they are (cuda, bf16, vocabulary 1024, 4000 steps of 64
#       examples); MOE_BIN defaults to build-gpu/moe when it exists.
#   cpu: a smoke run of the pipeline, not a measurement: cpu f32, one thread per run,
#       defaults --seq-lens 32 --pairs 4 --vocab 64 --train 20000 --steps 400 --seeds 1.
#   --seeds N     train.seed 1..N for every grid point (default 3 on gpu)
#   --first-seed S  train only seeds S..N (the table still covers 1..N from disk)
#   --seq-lens    model.seq_len values (each gets its own files: moe data mqar --seq-len)
#   --pairs       key-value pairs per example; a point with 4 x pairs > seq-len is skipped
#   --mixers      which of attention, gdn, mom to train (the table covers all on disk)
#   --steps S     train.steps (default: the config's); evaluation every S/4 steps
#   --jobs J      trainings at once (default 3 per GPU on gpu, 1 on cpu)
#   --gpus G      spread the jobs over G GPUs (CUDA_VISIBLE_DEVICES; default: all that
#                 nvidia-smi lists, else 1)
#   --vocab V     vocabulary of the task and the model (default 1024 gpu, 64 cpu)
#   --train N     training examples per grid point (default 100000 gpu; val: 1024)
#   --set k=v     passed to every run, after the script's own settings
#   --report      train nothing: the table and plot of the runs on disk
#   --merge "CSV ..."  runs.csv files of earlier calls (e.g. results/mqar/<date>/runs.csv):
#                 their runs join the table and plot where the runs on disk lack them
#   --continue    go on where an earlier call with the same settings stopped (trained runs
#                 kept, runs stopped by a signal resumed from their checkpoint; see
#                 scripts/ablate.sh --help)
#   --out DIR     where table.md etc. go (default results/mqar/<UTC date>[-cpu])
#   --work DIR    where data/ and runs/ below go (default: the source tree)
# Data: data/mqar/V<V>-T<T>-P<P>/ (train.bin, val.bin; made with --seed 1 when missing or
# made with other settings). Runs: runs/ablate-mqar/<mixer>-T<T>-P<P>-s<seed>/ (train.log,
# metrics.jsonl, last checkpoint, args.txt). Results in --out: table.md (final recall, mean ± std
# over seeds, and the best recall seen at any evaluation), runs.csv (every run), recall.png
# (recall against sequence length, one panel per pairs value, one line per mixer with
# the seeds' min-max band), setup.txt. A failed run is reported, the others go on, exit 1.
# Interrupted (Ctrl-C, TERM from timeout): the runs going are stopped, the table covers
# the finished ones; exit 130.
# Cost: on an H100 alone at seq_len 1024, attention trained at 5.6M tokens/s (vocabulary
# 1024); gdn at 1.6M and mom at 0.7M (vocabulary 8192; faster at 1024). The default grid
# is 4.1G training tokens per mixer: about 2 GPU-hours in all, most of it MoM. On one
# machine over several time-limited calls, repeat the same command with --continue
# (`timeout -s TERM` stops it with checkpoints). Across machines, split it
# over calls (--mixers, --seq-lens, --pairs, --first-seed), bring back each call's runs
# without checkpoints (tar czf runs.tgz --exclude='*.h5' runs/ablate-mqar), unpack them
# into one runs/ablate-mqar/ and write the table with --report, or merge the calls'
# runs.csv files (--report --merge) where the runs themselves were not kept.
# Throughput is not comparable between runs sharing a GPU (--jobs > 1).
# Environment: MOE_BIN (the moe program; default build/moe, built when missing).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
prog=ablate-mqar
source scripts/lib-ablate.sh

usage() { sed -n '2,/^# Environment/p' "$root/scripts/ablate-mqar.sh" | sed 's/^# \{0,1\}//'; }

mode=gpu seeds="" first_seed=1 seq_lens="" pairs="" mixers="attention,gdn,mom" steps="" jobs="" gpus="" vocab="" n_train=""
report=0 merge="" out="" work=. extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|gpu) mode=$1 ;;
    --seeds) seeds=${2:-}; shift ;;
    --first-seed) first_seed=${2:-}; shift ;;
    --seq-lens) seq_lens=${2:-}; shift ;;
    --pairs) pairs=${2:-}; shift ;;
    --mixers) mixers=${2:-}; shift ;;
    --steps) steps=${2:-}; shift ;;
    --jobs) jobs=${2:-}; shift ;;
    --gpus) gpus=${2:-}; shift ;;
    --vocab) vocab=${2:-}; shift ;;
    --train) n_train=${2:-}; shift ;;
    --out) out=${2:-}; shift ;;
    --work) work=${2:-}; shift ;;
    --report) report=1 ;;
    --merge) merge=${2:-}; shift ;;
    --continue) continue_runs=1 ;;
    --set) [ -n "${2:-}" ] || die "--set needs key=value"; extra+=(--set "$2"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ablate-mqar: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ "$mode" = cpu ]; then
  : "${seeds:=1}" "${seq_lens:=32}" "${pairs:=4}" "${vocab:=64}" "${n_train:=20000}" "${steps:=400}" "${jobs:=1}" "${gpus:=1}"
  : "${out:=results/mqar/$(date -u +%F)-cpu}"
else
  : "${seeds:=3}" "${seq_lens:=256 512 1024}" "${pairs:=16 32 64}" "${vocab:=1024}" "${n_train:=100000}"
  if [ -z "$gpus" ]; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${gpus:-0}" -ge 1 ] || gpus=1
  fi
  : "${jobs:=$((3 * gpus))}" "${out:=results/mqar/$(date -u +%F)}"
fi
for v in "$seeds" "$first_seed" "$jobs" "$gpus" "$vocab" "$n_train"; do posint "$v" || die "expected a positive integer, got '$v'"; done
[ "$first_seed" -le "$seeds" ] || die "--first-seed must be at most --seeds"
[ -z "$steps" ] || posint "$steps" || die "--steps needs a positive integer"
for v in $seq_lens $pairs; do posint "$v" || die "--seq-lens and --pairs take positive integers, got '$v'"; done
IFS=, read -r -a mixer_list <<<"$mixers"
for m in "${mixer_list[@]}"; do [ -f "configs/mqar-$m.yaml" ] || die "--mixers: no configs/mqar-$m.yaml"; done
for f in $merge; do [ -f "$f" ] || die "--merge: no file $f"; done

find_moe "$mode"

base=(--set "model.vocab_size=$vocab" --set checkpoint.keep=1 --set checkpoint.every=0)
[ -z "$steps" ] || base+=(--set "train.steps=$steps" --set "train.eval_every=$(( steps / 4 > 0 ? steps / 4 : 1 ))")
[ "$mode" = gpu ] || base+=(--set train.device=cpu --set train.dtype=f32 --set train.threads=1)
runs=$work/runs/ablate-mqar run_root=$work/runs/ablate-mqar
mkdir -p "$runs" "$out"
setup="$mode vocab=$vocab train=$n_train ${base[*]} ${extra[*]}${merge:+ merged: $merge}"
echo "$setup" >"$out/setup.txt"

# The files of one grid point, made when missing or made with other settings.
data_for() { # T P -> prints the directory
  local dir=$work/data/mqar/V$vocab-T$1-P$2 stamp="mqar seq_len=$1 pairs=$2 vocab=$vocab train=$n_train val=1024 seed=1"
  if [ ! -s "$dir/val.bin" ] || [ "$(cat "$dir/stamp" 2>/dev/null)" != "$stamp" ]; then
    "$moe" data mqar --out "$dir" --seq-len "$1" --pairs "$2" --vocab "$vocab" --train "$n_train" --val 1024 \
      --seed 1 >&2 || return 1
    echo "$stamp" >"$dir/stamp"
  fi
  echo "$dir"
}

n=0 slot=0
run_summary() { # name: its last validation recall
  echo "recall $(grep -o '"val_recall":[0-9.]*' "$runs/$1/metrics.jsonl" | tail -n1 | cut -d: -f2)"
}
trap stop INT TERM

if [ "$report" = 0 ]; then
  points=()
  for T in $seq_lens; do for P in $pairs; do
    if [ $((4 * P)) -gt "$T" ]; then echo "ablate-mqar: skipping T=$T P=$P (4 x pairs > seq-len)" >&2; continue; fi
    points+=("$T:$P")
  done; done
  total=$(( ${#points[@]} * ${#mixer_list[@]} * (seeds - first_seed + 1) ))
  echo "ablate-mqar ($mode): ${#mixer_list[@]} mixers x ${#points[@]} points x seeds $first_seed..$seeds = $total runs," \
    "$jobs at a time on $gpus device(s); $moe; runs in $runs/, results in $out/" >&2
  for ((s = first_seed; s <= seeds; s++)); do
    for pt in "${points[@]}"; do
      T=${pt%:*} P=${pt#*:}
      [ "$interrupted" = 0 ] || break 2
      data=$(data_for "$T" "$P") || { echo "ablate-mqar: could not make the data for T=$T P=$P" >&2; exit 1; }
      for m in "${mixer_list[@]}"; do
        reap "$jobs"
        [ "$interrupted" = 0 ] || break 3
        name=$m-T$T-P$P-s$s dir=$runs/$m-T$T-P$P-s$s
        args=(train "configs/mqar-$m.yaml" "${base[@]}" --set "model.seq_len=$T" --set "data.train_path=$data/train.bin"
              --set "data.val_path=$data/val.bin" --set "train.seed=$s" --set "checkpoint.dir=$dir" "${extra[@]}")
        prepare_run "$dir" "${args[@]}"
        start_run "$name" "$dir" "CUDA_VISIBLE_DEVICES=$((slot % gpus))" "${args[@]}"
        [ "$run_start" = done ] || slot=$((slot + 1))
      done
    done
  done
  reap 1
fi
trap - INT TERM

/usr/bin/python3 - "$runs" "$out" "$mode" "$seeds" "$seq_lens" "$pairs" "$vocab" "$setup" "$merge" <<'PY' || echo "ablate-mqar: table or plot failed" >&2
import json, math, os, re, sys

runs, out, mode, seeds, seq_lens, pairs, vocab, setup, merge = sys.argv[1:10]
seeds, vocab = int(seeds), int(vocab)
seq_lens = [int(x) for x in seq_lens.split()]
pairs = [int(x) for x in pairs.split()]
mixers = ["attention", "gdn", "mom"]
NAME = re.compile(r"^(attention|gdn|mom)-T(\d+)-P(\d+)-s(\d+)$")
PARAMS = re.compile(r"^model: [0-9.]+M parameters \((\d+);", re.M)
TRAINED = re.compile(r"^trained (\d+) steps: .*?, ([0-9.]+) tokens/s", re.M)

def run_result(d):
    """Final and best val_recall, final val_loss, parameters, steps, tokens/s of a finished run, else None."""
    log = os.path.join(d, "train.log")
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    t = TRAINED.search(text)
    if not t:
        return None
    recalls, loss = [], None
    with open(os.path.join(d, "metrics.jsonl")) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "val_recall" in rec:
                recalls.append(rec["val_recall"])
                loss = rec.get("val_loss")
    if not recalls:
        return None
    p = PARAMS.search(text)
    return {"final": recalls[-1], "best": max(recalls), "val_loss": loss, "params": int(p.group(1)) if p else None,
            "steps": int(t.group(1)), "tokens_per_s": float(t.group(2))}

results = {}  # (mixer, T, P) -> {seed: result}
for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
    m = NAME.match(name)
    if not m:
        continue
    mixer, T, P, s = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    if T not in seq_lens or P not in pairs or s > seeds:
        continue
    r = run_result(os.path.join(runs, name))
    if r:
        results.setdefault((mixer, T, P), {})[s] = r

for path in merge.split():  # earlier calls' runs.csv: the runs the disk lacks
    with open(path) as f:
        head = f.readline().strip().split(",")
        for line in f:
            row = dict(zip(head, line.strip().split(",")))
            mixer, T, P, s = row["mixer"], int(row["seq_len"]), int(row["pairs"]), int(row["seed"])
            if T not in seq_lens or P not in pairs or s > seeds or s in results.get((mixer, T, P), {}):
                continue
            results.setdefault((mixer, T, P), {})[s] = {
                "final": float(row["final_recall"]), "best": float(row["best_recall"]),
                "val_loss": float(row["val_loss"]) if row["val_loss"] not in ("", "None") else None,
                "params": int(row["params"]) if row["params"] not in ("", "None") else None,
                "steps": int(row["steps"]), "tokens_per_s": float(row["tokens_per_s"])}

def stats(xs):
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, sd

def cell(key, field):
    rs = results.get(key, {})
    mean, sd = stats([r[field] for r in rs.values()])
    if mean is None:
        return "–"
    n = f" ({len(rs)})" if len(rs) != seeds else ""
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "") + n

with open(os.path.join(out, "runs.csv"), "w") as f:
    f.write("mixer,seq_len,pairs,seed,final_recall,best_recall,val_loss,params,steps,tokens_per_s\n")
    for (mixer, T, P), rs in sorted(results.items()):
        for s, r in sorted(rs.items()):
            f.write(f"{mixer},{T},{P},{s},{r['final']:.6f},{r['best']:.6f},{r['val_loss']},{r['params']},"
                    f"{r['steps']},{r['tokens_per_s']:.0f}\n")

present = [m for m in mixers if any(k[0] == m for k in results)]
params = {m: sorted({r["params"] for k, rs in results.items() if k[0] == m for r in rs.values()}) for m in present}
steps = sorted({r["steps"] for rs in results.values() for r in rs.values()})
chance = 1.0 / (vocab - vocab // 2)
with open(os.path.join(out, "table.md"), "w") as f:
    title = "MQAR recall" + (" — CPU smoke run of the pipeline (tiny; not a measurement)" if mode == "cpu" else "")
    f.write(f"# {title}\n\n")
    f.write(f"`scripts/ablate-mqar.sh {mode}`; settings: `{setup}`.\n")
    f.write(f"Vocabulary {vocab} (chance, a uniform guess among the values: {chance:.5f}); "
            f"{', '.join(map(str, steps))} training steps; seeds 1..{seeds}.\n")
    f.write("Recall: the share of the validation queries (1024 examples x pairs) whose argmax is the value, "
            "at the last evaluation; mean ± sample std over seeds (a count in brackets when fewer seeds finished).\n")
    f.write("Parameters (total, from the train logs): "
            + "; ".join(f"{m} {', '.join(f'{p:,}' for p in params[m] if p)}" for m in present) + ".\n\n")
    for field, what in (("final", "Recall at the end of training"), ("best", "Best recall at any evaluation")):
        f.write(f"## {what}\n\n| mixer | seq_len | " + " | ".join(f"{P} pairs" for P in pairs) + " |\n")
        f.write("|---|---|" + "---|" * len(pairs) + "\n")
        for m in present:
            for T in seq_lens:
                f.write(f"| {m} | {T} | " + " | ".join(
                    cell((m, T, P), field) if 4 * P <= T else "n/a" for P in pairs) + " |\n")
        f.write("\n")
print(os.path.join(out, "table.md"))

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as e:
    sys.exit(f"no plot: {e}")
if not results:
    sys.exit("no finished runs: nothing to plot")
fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False, sharey=True)
for ax, P in zip(axes[0], pairs):
    for m in present:
        xs, mean, lo, hi = [], [], [], []
        for T in seq_lens:
            rs = results.get((m, T, P))
            if not rs:
                continue
            vals = [r["final"] for r in rs.values()]
            xs.append(T); mean.append(sum(vals) / len(vals)); lo.append(min(vals)); hi.append(max(vals))
        if xs:
            line, = ax.plot(xs, mean, "o-", label=m)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(chance, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(seq_lens)
    ax.set_xticklabels([str(T) for T in seq_lens])
    ax.set_title(f"{P} key-value pairs")
    ax.set_xlabel("sequence length")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
axes[0][0].set_ylabel("recall (mean over seeds, band = min-max)")
axes[0][-1].legend(loc="lower left", fontsize=8)
fig.suptitle("MQAR recall" + (" (CPU smoke run, tiny)" if mode == "cpu" else ""), fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(out, "recall.png"), dpi=120)
print(os.path.join(out, "recall.png"))
PY
[ -f "$out/table.md" ] && cat "$out/table.md"
if [ ${#failed[@]} -gt 0 ]; then echo "ablate-mqar: failed runs: ${failed[*]} (logs: $runs/<run>/train.log)" >&2; fi
[ "$interrupted" = 0 ] || exit 130
[ ${#failed[@]} -eq 0 ] || exit 1
