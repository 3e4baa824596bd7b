#!/usr/bin/env bash
# Router and token-mixer ablations: trains one model per variant and seed, then writes a
# results table and plots. scripts/ablate-routers.sh and scripts/ablate-mixers.sh call this.
#
# Usage: scripts/ablate.sh routers|mixers [cpu|gpu] [--seeds N] [--steps S | --horizon H]
#                          [--jobs J] [--variants a,b,...] [--set key=value ...] [--continue]
#                          [--report] [--out DIR]
#   cpu (default): configs/tiny-cpu.yaml.  gpu: configs/ablate-gpu.yaml (byte-level,
#       bf16 on one GPU; MOE_BIN defaults to build-gpu/moe when it exists).
#   --seeds N     seeds 1..N (default 3); the same N seeds for every variant
#   --first-seed S  train only seeds S..N (the table still covers 1..N from disk)
#   --steps S     train.steps (default: the config's); also sets train.eval_every to S/5
#   --horizon H   train.steps = H x the config's (as --steps). `--seeds 3 --horizon 4`
#                 is on gpu 2400 steps of 16k tokens, 39M tokens per run, 4.8x the
#                 500-step H200 table of results/README.md (8.2M), and about 7 passes over
#                 Brown's 5.7M training bytes (watch val_curves.png for overfitting)
#   --jobs J      trainings run at once (default 1 on cpu, 4 on gpu); on cpu with J > 1
#                 each run gets train.threads = cores / J. Runs on a GPU share it.
#   --variants    run only these (comma-separated); the table and plots still cover
#                 every variant, reading whatever runs are on disk (setup.txt keeps the
#                 last settings; a re-run with other settings warns)
#   --set k=v     passed to every run, after the variant's own settings
#   --report      train nothing: write the table and plots from the runs on disk (e.g. runs
#                 gathered from several GPU calls into runs/ablate-<kind>/)
#   --continue    go on where an earlier call with the same settings stopped: runs that
#                 trained are kept, runs stopped by a signal (TERM from timeout saves a
#                 checkpoint) resume from their checkpoint; the rest start
#                 (a long grid over several time-limited calls on one machine)
#   --out DIR     where the runs, the table and the plots go (default runs/ablate-<kind>)
# Variants (every run: same config, parameter budget and tokens, except as noted):
#   routers: topk (router.type=topk, balance switch), rmoe (type rmoe), rmoe-detach
#            (rmoe, router.rmoe_detach=true), ot (type ot), topk-auxfree (topk, balance
#            aux_free); seed s is train.seed=s
#   mixers:  attention, mom, gdn (single-memory gated delta net) via model.mixer, and
#            hybrid: model.mixer=[attention,mom,attention,mom,...] over the config's
#            n_layers; seed s is train.seed=1233+s
# Output under runs/ablate-<kind>/ (or --out): <variant>-s<seed>/ (train.log, metrics.jsonl, the
# last checkpoint), results.md (val_loss / val_bpb mean ± std over seeds, tokens/s,
# expert-load CV, parameters), val_curves.png (validation loss and bits per byte, mean
# over seeds with the min-max band), val_loss.png (every run, scripts/plot-run.py),
# expert_load.png (per variant, seed 1: token share per layer and expert at the last
# logged step). A run that fails is reported and the rest go on; exit status 1 then.
# Interrupted (Ctrl-C, TERM from timeout): the runs going are stopped, no more start, the
# table and plots cover the finished runs; exit status 130.
# Environment: MOE_BIN (the moe program; default build/moe, built when missing).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
caller=$PWD # a relative --out is the caller's
cd "$root" || exit 1
prog=ablate
source scripts/lib-ablate.sh

usage() { sed -n '5,/^# Environment/p' "$root/scripts/ablate.sh" | sed 's/^# \{0,1\}//'; }

kind=${1:-}
case "$kind" in
  routers|mixers) shift ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac
mode=cpu seeds=3 first_seed=1 steps="" horizon="" jobs="" only="" report=0 extra=() out=runs/ablate-$kind
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|gpu) mode=$1 ;;
    --seeds) seeds=${2:-}; shift ;;
    --first-seed) first_seed=${2:-}; shift ;;
    --steps) steps=${2:-}; shift ;;
    --horizon) horizon=${2:-}; shift ;;
    --jobs) jobs=${2:-}; shift ;;
    --variants) only=${2:-}; shift ;;
    --report) report=1 ;;
    --out) [ -n "${2:-}" ] || die "--out needs a directory"; out=$2; [ "${out#/}" != "$out" ] || out=$caller/$out; shift ;;
    --continue) continue_runs=1 ;;
    --set) [ -n "${2:-}" ] || die "--set needs key=value"; extra+=(--set "$2"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ablate: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
posint "$seeds" || die "--seeds needs a positive integer"
posint "$first_seed" && [ "$first_seed" -le "$seeds" ] || die "--first-seed needs an integer in 1..--seeds"
[ -z "$steps" ] || posint "$steps" || die "--steps needs a positive integer"
[ -z "$horizon" ] || posint "$horizon" || die "--horizon needs a positive integer"
[ -z "$steps" ] || [ -z "$horizon" ] || die "give --steps or --horizon, not both"
[ -n "$jobs" ] || { [ "$mode" = gpu ] && jobs=4 || jobs=1; }
posint "$jobs" || die "--jobs needs a positive integer"

find_moe "$mode"

if [ "$mode" = gpu ]; then config=configs/ablate-gpu.yaml; else config=configs/tiny-cpu.yaml; fi
# Both configs read byte tokens of the Brown corpus.
if [ ! -s data/brown/train.bin ] || [ ! -s data/brown/val.bin ]; then
  echo "ablate: preparing data/brown (scripts/get-brown.sh, moe data prepare)" >&2
  if ! { scripts/get-brown.sh data/brown && "$moe" data prepare --out data/brown data/brown/brown.txt >&2; }; then
    echo "ablate: could not prepare data/brown/train.bin and val.bin" >&2
    exit 1
  fi
fi

# Settings every run shares; the user's --set come last so they win.
if [ -n "$horizon" ]; then # H x the config's train.steps
  config_steps=$("$moe" config "$config" "${extra[@]}" 2>/dev/null |
    awk '/^[a-z]/ { in_s = ($1 == "train:") } in_s && $1 == "steps:" { print $2; exit }')
  posint "${config_steps:-}" || die "could not read train.steps of $config"
  steps=$(( config_steps * horizon ))
fi
base=(--set checkpoint.keep=1)
[ -z "$steps" ] || base+=(--set "train.steps=$steps" --set "train.eval_every=$(( steps / 5 > 0 ? steps / 5 : 1 ))")
if [ "$jobs" -gt 1 ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  base+=(--set "train.threads=$(( cores / jobs > 0 ? cores / jobs : 1 ))")
fi
effective=$("$moe" config "$config" "${base[@]}" "${extra[@]}" 2>&1) ||
  { echo "$effective" | tail -n 5 >&2; die "the config does not load with these settings"; }
cfg() { # section key: a value of the effective config
  awk -v s="$1:" -v k="  $2:" '/^[a-z]/ { in_s = ($1 == s) } in_s && index($0, k) == 1 { print $2; exit }' <<<"$effective"
}
n_layers=$(cfg model n_layers)
tokens_per_run=$(( $(cfg train steps) * $(cfg data batch_size) * $(cfg model seq_len) ))

declare -A sets=()
if [ "$kind" = routers ]; then
  variants=(topk rmoe rmoe-detach ot topk-auxfree)
  sets=(
    [topk]="router.type=topk router.balance=switch"
    [rmoe]="router.type=rmoe router.balance=switch"
    [rmoe-detach]="router.type=rmoe router.balance=switch router.rmoe_detach=true"
    [ot]="router.type=ot router.balance=switch"
    [topk-auxfree]="router.type=topk router.balance=aux_free"
  )
  seed_base=0
else
  variants=(attention mom gdn hybrid)
  hybrid=attention
  for ((l = 1; l < n_layers; l++)); do
    if ((l % 2)); then hybrid+=",mom"; else hybrid+=",attention"; fi
  done
  sets=(
    [attention]="model.mixer=attention"
    [mom]="model.mixer=mom"
    [gdn]="model.mixer=gdn"
    [hybrid]="model.mixer=[$hybrid]" # one entry per layer: must match model.n_layers
  )
  seed_base=1233 # the seeds the README's CPU tables were made with
fi
run_variants=("${variants[@]}")
if [ -n "$only" ]; then
  IFS=, read -r -a run_variants <<<"$only"
  for v in "${run_variants[@]}"; do
    [ -n "${sets[$v]+x}" ] || die "--variants: no variant '$v' (have: ${variants[*]})"
  done
fi

run_root=$out
mkdir -p "$out"
# The table reads every run on disk: say so when a partial re-run (--variants) mixes setups.
setup="$mode $config ${base[*]} ${extra[*]}"
if [ -n "$only" ] && [ -f "$out/setup.txt" ] && [ "$(cat "$out/setup.txt")" != "$setup" ]; then
  echo "ablate: warning: the other runs in $out were made with: $(cat "$out/setup.txt")" >&2
fi
echo "$setup" >"$out/setup.txt"
echo "ablate $kind ($mode): $config, $moe, ${#run_variants[@]} variants x $seeds seeds," \
  "$jobs at a time, $tokens_per_run tokens per run; runs in $out/" >&2

# The run loop: seed-major order, so every variant has seed 1 before any has seed 2.
total=$(( ${#run_variants[@]} * (seeds - first_seed + 1) )) n=0
run_summary() { # name: the trained line of its log
  local line
  line=$(grep -m1 '^trained' "$out/$1/train.log")
  echo "${line#trained }"
}
trap stop INT TERM

[ "$report" = 0 ] || run_variants=() # --report: straight to the table
for ((s = first_seed; s <= seeds; s++)); do
  for v in "${run_variants[@]}"; do
    reap "$jobs"
    [ "$interrupted" = 0 ] || break 2
    name=$v-s$s dir=$out/$v-s$s
    args=(train "$config" "${base[@]}")
    for kv in ${sets[$v]}; do args+=(--set "$kv"); done
    args+=(--set "train.seed=$((seed_base + s))" --set "checkpoint.dir=$dir" "${extra[@]}")
    prepare_run "$dir" "${args[@]}"
    start_run "$name" "$dir" "" "${args[@]}"
  done
done
reap 1
trap - INT TERM # a second Ctrl-C stops the table and plots

# results.md, val_curves.png, expert_load.png
settings=()
for v in "${variants[@]}"; do settings+=("$v=${sets[$v]}"); done
/usr/bin/python3 - "$out" "$kind" "$mode" "$seeds" "$jobs" "$config" "$tokens_per_run" "${extra[*]}" \
  "${settings[@]}" <<'PY' || echo "ablate: results table or plots failed" >&2
import importlib.util, math, os, re, sys

out, kind, mode, seeds, jobs, config, tokens, extra = sys.argv[1:9]
seeds, jobs = int(seeds), int(jobs)
settings = dict(a.split("=", 1) for a in sys.argv[9:])
variants = list(settings)

spec = importlib.util.spec_from_file_location("plot_run", os.path.join("scripts", "plot-run.py"))
pr = importlib.util.module_from_spec(spec)
try:
    spec.loader.exec_module(pr)  # read_metrics / series / load_matrix; exits without matplotlib
except SystemExit as e:
    print(e, file=sys.stderr)
    pr = None

def mean_std(xs, digits=4):
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"

def last_with(metrics, key):
    """The last record of metrics.jsonl whose `key` is set, or None."""
    import json
    last = None
    with open(metrics) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get(key):
                last = rec
    return last

def last_load(metrics):
    """The expert_load of the last record that has one: a list per MoE layer of expert shares."""
    rec = last_with(metrics, "expert_load")
    return rec and rec["expert_load"]

def last_eval(metrics):
    """(step, val_loss, val_bpb) of the last record with a validation, or None."""
    rec = last_with(metrics, "val_bpb")
    return rec and (rec["step"], rec["val_loss"], rec["val_bpb"])

def load_cv(load):
    """Mean over MoE layers of std/mean (population std) of the expert shares."""
    cvs = []
    for shares in load:
        m = sum(shares) / len(shares)
        sd = math.sqrt(sum((x - m) ** 2 for x in shares) / len(shares))
        cvs.append(sd / m if m > 0 else 0.0)
    return sum(cvs) / len(cvs) if cvs else None

TRAINED = re.compile(r"^trained \d+ steps: .*?val_loss (\S+), val_bpb (\S+) .*?, ([0-9.]+) tokens/s", re.M)
PARAMS = re.compile(r"^model: ([0-9.]+M) parameters", re.M)
rows, finished, stopped = [], {}, []
for v in variants:
    vl, vb, tps, cv, params, ok = [], [], [], [], set(), 0
    for s in range(1, seeds + 1):
        d = os.path.join(out, f"{v}-s{s}")
        log = os.path.join(d, "train.log")
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        if (m := PARAMS.search(text)):
            params.add(m.group(1))
        m = TRAINED.search(text)
        if not m:
            mp = os.path.join(d, "metrics.jsonl")
            if text and os.path.exists(mp) and (e := last_eval(mp)):
                stopped.append((v, s) + e)
            continue
        ok += 1
        finished.setdefault(v, []).append(d)
        vl.append(float(m.group(1)))
        vb.append(float(m.group(2)))
        tps.append(float(m.group(3)))
        mp = os.path.join(d, "metrics.jsonl")
        load = last_load(mp) if os.path.exists(mp) else None
        if load and (c := load_cv(load)) is not None:
            cv.append(c)
    rows.append((v, f"{ok}/{seeds}", mean_std(vl), mean_std(vb), f"{sum(tps) / len(tps):.0f}" if tps else "n/a",
                 mean_std(cv, 3), ", ".join(sorted(params)) or "n/a"))

title = {"routers": "Router ablation", "mixers": "Token-mixer ablation"}[kind]
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# {title} ({mode}: {config})\n\n")
    f.write(f"{seeds} seed(s) per variant, {int(tokens):,} training tokens per run"
            + (f", extra settings: `{extra}`" if extra else "") + ".\n")
    f.write("val_loss (nats/token), val_bpb (bits per byte), expert-load CV: at the last step, mean ± std\n"
            "(sample std) over the seeds that finished, just the mean for one.\n"
            "tokens/s: mean training throughput per run"
            + (f", measured with up to {jobs} runs sharing the\n{'GPU' if mode == 'gpu' else 'CPU cores'}"
               " (compare within this table only)" if jobs > 1 else "") + ".\n"
            "Expert-load CV: per MoE layer, std/mean of the expert token shares at the last logged step,\n"
            "averaged over layers (0 = perfectly balanced). Parameters: from the train log (total).\n")
    if kind == "routers":
        f.write("RMoE adds the shared GRU (6 p×p + 6 p) and per layer P_i (d×p) and G_i (p×E) in place of\n"
                "W_g (d×E), so it is not parameter-matched; the other routers have the same parameters.\n")
    else:
        f.write("MoM and the gated delta net have their own projections, so the mixers differ in size.\n")
    f.write("\n| variant | runs ok | val_loss | val_bpb | tokens/s | expert-load CV | parameters |\n")
    f.write("|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write("| " + " | ".join(r) + " |\n")
    if stopped:
        f.write("\nRuns stopped before the end (not in the table above), at their last evaluation:\n\n"
                "| variant | seed | step | val_loss | val_bpb |\n|---|---|---|---|---|\n")
        for v, s, step, vl, vb in stopped:
            f.write(f"| {v} | {s} | {step} | {vl:.4f} | {vb:.4f} |\n")
    f.write("\nSettings per variant (`--set`):\n\n")
    for v in variants:
        f.write(f"- {v}: `{settings[v]}`\n")
print(os.path.join(out, "results.md"))
sys.stdout.flush()

if not finished:
    print("no finished runs: nothing to plot", file=sys.stderr)
if pr is None or not finished:
    sys.exit(0)
plt, np = pr.plt, pr.np
colours = dict(zip(variants, plt.cm.tab10.colors))

# Validation curves: per variant the mean over seeds (at the steps all its seeds logged) and the min-max band.
fig, axes = plt.subplots(2, 1, figsize=(9, 8.4), sharex=True)
for v, dirs in finished.items():
    for ax, key in zip(axes, ("val_loss", "val_bpb")):
        curves = [dict(zip(*pr.series(pr.read_metrics(d), key))) for d in dirs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        ys = np.array([[c[s] for s in steps] for c in curves])
        mean = ys.mean(axis=0)
        ax.plot(steps, mean, "o-", ms=3, lw=1.6, color=colours[v],
                label=f"{v} ({mean[-1]:.3f}, {len(dirs)} seed{'s' if len(dirs) > 1 else ''})")
        if len(dirs) > 1:
            ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=colours[v], alpha=0.18, lw=0)
for ax, what in zip(axes, ("validation loss (nats / token)", "validation bits per byte")):
    lines = [l.get_ydata() for l in ax.get_lines()]
    if lines:
        pr.set_loss_ylim(ax, [np.asarray(y, float) for y in lines])
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
axes[0].set_title(f"{title} ({mode}): mean over seeds, band = min-max (last mean in brackets)")
axes[1].set_xlabel("step")
print(pr.save(fig, os.path.join(out, "val_curves.png")))

# Expert-load heatmaps: one per variant, seed 1 (else its first finished seed), the last logged step.
maps = []
for v, dirs in finished.items():
    recs = [r for r in pr.read_metrics(dirs[0]) if pr.load_matrix(r) is not None]
    if recs:
        maps.append((v, os.path.basename(dirs[0]), recs[-1]["step"], pr.load_matrix(recs[-1])))
if maps:
    n_layers = max(m.shape[0] for *_, m in maps)
    n_experts = max(m.shape[1] for *_, m in maps)
    uniform = 1.0 / n_experts
    vmax = 100 * max(2 * uniform, max(np.nanmax(m) for *_, m in maps))
    norm = pr.TwoSlopeNorm(vmin=0.0, vcenter=100 * uniform, vmax=vmax)
    cols = 2 if len(maps) == 4 else min(3, len(maps))
    rows_ = math.ceil(len(maps) / cols)
    w, h = 0.5 * n_experts + 1.6, 0.42 * n_layers + 1.1
    fig, axs = plt.subplots(rows_, cols, figsize=(cols * w + 1.4, rows_ * h + 0.8), squeeze=False)
    for ax in axs.flat[len(maps):]:
        ax.axis("off")
    for ax, (v, run, step, m) in zip(axs.flat, maps):
        im = ax.imshow(m * 100, cmap="coolwarm", norm=norm, aspect="auto")
        if n_experts <= 16:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j] * 100:.0f}", ha="center", va="center", fontsize=7)
        cv = load_cv([[x for x in row if np.isfinite(x)] for row in m])
        ax.set_title(f"{v}  ({run}, step {step:.0f}, CV {cv:.2f})", fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("MoE layer", fontsize=8)
    fig.suptitle(f"{title} ({mode}): share of tokens per expert (%) at the last logged step; "
                 f"white = uniform ({100 * uniform:.1f}%)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    cax = fig.add_axes((0.945, 0.12, 0.015, 0.72))
    fig.colorbar(im, cax=cax, label="share of tokens (%)")
    fig.savefig(os.path.join(out, "expert_load.png"), dpi=120)
    plt.close(fig)
    print(os.path.join(out, "expert_load.png"))
PY

# Every finished run on shared axes (labelled by directory).
all_runs=()
for v in "${variants[@]}"; do
  for ((s = 1; s <= seeds; s++)); do
    grep -qs '^trained' "$out/$v-s$s/train.log" && all_runs+=("$out/$v-s$s")
  done
done
if [ ${#all_runs[@]} -gt 1 ]; then
  /usr/bin/python3 scripts/plot-run.py "${all_runs[@]}" --out "$out/" || echo "ablate: plot-run.py failed" >&2
fi
[ -f "$out/results.md" ] && cat "$out/results.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "ablate: failed runs: ${failed[*]} (logs: $out/<run>/train.log)" >&2
fi
[ "$interrupted" = 0 ] || exit 130
[ ${#failed[@]} -eq 0 ] || exit 1
