#!/usr/bin/env python3
"""Plot a training run's metrics.jsonl, or compare the validation curves of several runs.

Usage:
    python3 scripts/plot-run.py RUN_DIR [--out DIR]
        writes loss.png (training loss, raw and smoothed, validation loss; a
        second panel with validation bits per byte when logged) and
        expert_load.png (per-layer, per-expert token shares averaged over the
        last 20% of logged steps; per-layer coefficient of variation over steps)
        into DIR (default RUN_DIR).
    python3 scripts/plot-run.py RUN_A RUN_B ... --out DIR
        writes DIR/val_loss.png: validation loss (and bits per byte) of every
        run on shared axes, labelled by directory name; a run without
        validation points shows its smoothed training loss, dashed.
Each line of metrics.jsonl is a JSON object with "step" and any of "loss",
"tokens_per_s", "lr", "val_loss", "val_bpb", "aux_loss", "z_loss",
"grad_norm", "expert_load" (a list per MoE layer of per-expert token shares).
Missing fields are skipped; an unparsable line (a run killed mid-write) is
skipped with a note on stderr. The written paths are printed on stdout.
"""
import argparse
import json
import os
import re
import sys

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    import numpy as np
except ImportError as exc:
    sys.exit(f"plot-run.py: needs matplotlib and numpy ({exc}); on Debian: apt-get install python3-matplotlib")

C_NONFINITE = re.compile(r"(?<=[:,\[])\s*(-?)(nan|inf)\b", re.IGNORECASE)
LAST_FRACTION = 0.2  # expert loads are averaged over this last share of the logged steps


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as fh:
            lines = fh.read().split("\n")
    except OSError as exc:
        sys.exit(f"plot-run.py: cannot read {path}: {exc.strerror}; pass a run directory holding metrics.jsonl")
    records = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            try:  # C's printf writes nan, -nan, inf for a diverged run: read them as NaN / Infinity
                rec = json.loads(C_NONFINITE.sub(lambda m: "NaN" if "n" in m.group(2) else m.group(1) + "Infinity", line))
            except json.JSONDecodeError:
                rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            last = all(not rest.strip() for rest in lines[no:])
            what = "unparsable last line (partially written?)" if last else "unparsable line"
            print(f"plot-run.py: {path}:{no}: skipping {what}", file=sys.stderr)
            continue
        records.append(rec)
    if not records:
        sys.exit(f"plot-run.py: {path} holds no metrics lines with a \"step\"")
    return records


def series(records, key):
    """(steps, values) of the records that hold a numeric `key`."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def smooth(y):
    """Debiased exponential moving average; its time constant grows with the number of points."""
    tau = min(100.0, max(1.0, len(y) / 50.0))
    beta, acc, out = 1.0 - 1.0 / tau, 0.0, np.empty_like(y)
    for i, v in enumerate(y):
        acc = beta * acc + (1.0 - beta) * v
        out[i] = acc / (1.0 - beta ** (i + 1)) if beta > 0 else v
    return out


def run_label(run_dir):
    return os.path.basename(os.path.normpath(run_dir)) or run_dir


def set_loss_ylim(ax, arrays):
    """Start the y axis above the early, steep part of the curve so the tail stays readable."""
    finite = [a[np.isfinite(a)] for a in arrays]
    vals = np.concatenate([a for a in finite if len(a)] or [np.zeros(0)])
    if len(vals) < 10:
        return
    tail = np.concatenate([a[len(a) // 20:] for a in finite if len(a)])
    lo, hi = vals.min(), np.percentile(tail, 99.5)
    pad = 0.05 * max(hi - lo, 1e-6)
    ax.set_ylim(lo - pad, hi + pad)


def plot_loss(records, run_dir, out_dir):
    steps, loss = series(records, "loss")
    vsteps, vloss = series(records, "val_loss")
    bsteps, bpb = series(records, "val_bpb")
    panels = 2 if len(bpb) else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 4.2 * panels), squeeze=False, sharex=True)
    ax = axes[0, 0]
    if len(loss):
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train (raw)")
        ax.plot(steps, smooth(loss), color="tab:blue", lw=1.8, label="train (smoothed)")
    if len(vloss):
        ax.plot(vsteps, vloss, "o-", color="tab:orange", ms=4, lw=1.2, label="validation")
    set_loss_ylim(ax, [loss, vloss])
    ax.set_ylabel("loss (nats / token)")
    _, tps = series(records, "tokens_per_s")
    facts = [f"last train {smooth(loss)[-1]:.3f}" if len(loss) else "",
             f"last val {vloss[-1]:.3f}" if len(vloss) else "",
             f"median {np.median(tps):,.0f} tokens/s" if len(tps) else ""]
    ax.set_title(f"{run_label(run_dir)}: loss   ({', '.join(f for f in facts if f)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if panels == 2:
        ax2 = axes[1, 0]
        ax2.plot(bsteps, bpb, "o-", color="tab:green", ms=4, lw=1.2)
        ax2.set_ylabel("validation bits per byte")
        ax2.set_title(f"validation bits per byte (last {bpb[-1]:.3f}, best {bpb.min():.3f})")
        ax2.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return save(fig, os.path.join(out_dir, "loss.png"))


def load_matrix(rec):
    """The record's expert_load as a layers × experts array (ragged layers padded with NaN)."""
    rows = rec.get("expert_load")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        return None
    m = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        m[i, :len(r)] = r
    return m


def plot_expert_load(records, run_dir, out_dir):
    loads = [(r["step"], m) for r in records if (m := load_matrix(r)) is not None]
    if loads:  # keep the shape most lines have; a layer-count change mid-run is left out
        shapes = [m.shape for _, m in loads]
        shape = max(set(shapes), key=shapes.count)
        loads = [(s, m) for s, m in loads if m.shape == shape]
    if not loads:
        print(f"plot-run.py: {run_dir}: no expert_load field logged; expert_load.png not written",
              file=sys.stderr)
        return None
    steps = np.array([s for s, _ in loads], float)
    stack = np.stack([m for _, m in loads])  # steps × layers × experts
    tail = stack[int(len(stack) * (1 - LAST_FRACTION)):] if len(stack) > 1 else stack
    mean = np.nanmean(tail, axis=0)
    n_layers, n_experts = mean.shape
    uniform = 1.0 / n_experts
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(min(16, max(8, 0.55 * n_experts + 3)), 4 + 0.45 * n_layers + 3.5),
                                  gridspec_kw={"height_ratios": [0.5 + 0.45 * n_layers, 3.5]})
    vmax = 100 * max(2 * uniform, np.nanmax(mean))  # blue: under-used, white: uniform, red: over-used
    im = ax.imshow(mean * 100, cmap="coolwarm", aspect="auto",
                   norm=TwoSlopeNorm(vmin=0.0, vcenter=uniform * 100, vmax=vmax))
    if n_layers * n_experts <= 400:
        size = 9 if n_experts <= 16 else 6
        for i in range(n_layers):
            for j in range(n_experts):
                if np.isfinite(mean[i, j]):
                    ax.text(j, i, f"{mean[i, j] * 100:.1f}", ha="center", va="center", fontsize=size)
    ax.set_xticks(range(0, n_experts, 1 if n_experts <= 16 else 2 if n_experts <= 32 else 4))
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"layer {i}" for i in range(n_layers)])
    ax.set_xlabel("expert")
    ax.set_title(f"{run_label(run_dir)}: share of tokens per expert (%), uniform = {uniform * 100:.1f}%\n"
                 f"mean of the last {len(tail)} of {len(stack)} logged steps "
                 f"(steps {steps[-len(tail)]:.0f}-{steps[-1]:.0f})")
    fig.colorbar(im, ax=ax, label="share of tokens (%)", pad=0.01)
    with np.errstate(invalid="ignore", divide="ignore"):  # a layer with no tokens logged gives NaN
        cv = np.nanstd(stack, axis=2) / np.nanmean(stack, axis=2)  # steps × layers, across experts
    for i in range(n_layers):
        ax2.plot(steps, cv[:, i], lw=1.3, label=f"layer {i}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("coefficient of variation")
    ax2.set_title("load imbalance per layer: std / mean of the expert shares (0 = perfectly balanced)")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right", ncol=min(4, n_layers), fontsize=8)
    return save(fig, os.path.join(out_dir, "expert_load.png"))


def plot_compare(runs, out_dir):
    has_bpb = any(len(series(recs, "val_bpb")[0]) for _, recs in runs)
    panels = 2 if has_bpb else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 4.2 * panels), squeeze=False, sharex=True)
    plotted = []
    labels = [run_label(d) for d, _ in runs]
    for (run_dir, recs), label, colour in zip(runs, labels, plt.cm.tab10.colors * 10):
        if labels.count(label) > 1:
            label = run_dir
        vsteps, vloss = series(recs, "val_loss")
        if len(vloss):
            axes[0, 0].plot(vsteps, vloss, "o-", ms=3, lw=1.4, color=colour, label=f"{label} ({vloss[-1]:.3f})")
            plotted.append(vloss)
        else:
            steps, loss = series(recs, "loss")
            if len(loss):
                sm = smooth(loss)
                axes[0, 0].plot(steps, sm, "--", lw=1.4, color=colour, label=f"{label} (train, no val)")
                plotted.append(sm)
        if has_bpb:
            bsteps, bpb = series(recs, "val_bpb")
            if len(bpb):
                axes[1, 0].plot(bsteps, bpb, "o-", ms=3, lw=1.4, color=colour, label=f"{label} ({bpb[-1]:.3f})")
    set_loss_ylim(axes[0, 0], plotted)
    axes[0, 0].set_ylabel("validation loss (nats / token)")
    axes[0, 0].set_title(f"validation loss, {len(runs)} runs (last value in brackets)")
    if has_bpb:
        axes[1, 0].set_ylabel("validation bits per byte")
        axes[1, 0].set_title("validation bits per byte")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    return save(fig, os.path.join(out_dir, "val_loss.png"))


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", help="output directory (default: RUN_DIR; required with several runs)")
    args = ap.parse_args()
    if len(args.run_dirs) > 1 and not args.out:
        ap.error("comparing several runs needs --out DIR")
    out_dir = args.out or args.run_dirs[0]
    os.makedirs(out_dir, exist_ok=True)
    if len(args.run_dirs) == 1:
        records = read_metrics(args.run_dirs[0])
        written = [plot_loss(records, args.run_dirs[0], out_dir),
                   plot_expert_load(records, args.run_dirs[0], out_dir)]
    else:
        written = [plot_compare([(d, read_metrics(d)) for d in args.run_dirs], out_dir)]
    for path in written:
        if path:
            print(path)


if __name__ == "__main__":
    main()
