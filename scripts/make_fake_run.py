#!/usr/bin/env python3
"""Write a plausible DIR/metrics.jsonl so scripts/plot-run.py can be tried
without training: a decaying loss with noise, a warmup + cosine learning
rate, validation every --val-every steps, router losses, grad norms and
per-layer expert loads that start unbalanced and even out.

Usage: python3 scripts/make_fake_run.py DIR [--steps N] [--layers L] [--experts E]
           [--final-loss X] [--seed S] [--partial]
--partial appends half a line, as a run killed mid-write leaves it.
"""
import argparse
import json
import math
import os
import random


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--final-loss", type=float, default=1.6, help="loss the curve decays towards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--partial", action="store_true", help="end with a partially written line")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "metrics.jsonl")
    warmup, peak_lr = max(1, args.steps // 20), 1e-3
    # Each layer has a fixed preference per expert that fades as the router balances.
    bias = [[rng.gauss(0.0, 1.0) for _ in range(args.experts)] for _ in range(args.layers)]
    start_loss = math.log(256.0)  # byte-level vocabulary at init
    with open(path, "w") as fh:
        for step in range(args.log_every, args.steps + 1, args.log_every):
            t = step / args.steps
            mean_loss = args.final_loss + (start_loss - args.final_loss) * math.exp(-step / (0.08 * args.steps))
            if step < warmup:
                lr = peak_lr * step / warmup
            else:
                lr = 0.1 * peak_lr + 0.45 * peak_lr * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))
            imbalance = 0.15 + 1.2 * math.exp(-step / (0.15 * args.steps))
            loads = []
            for layer in range(args.layers):
                w = [math.exp(imbalance * (1 + 0.3 * layer) * b + rng.gauss(0.0, 0.08)) for b in bias[layer]]
                loads.append([round(x / sum(w), 5) for x in w])
            cv = sum(math.sqrt(sum((s - 1 / args.experts) ** 2 for s in row) / args.experts) * args.experts
                     for row in loads) / args.layers
            rec = {"step": step,
                   "loss": round(mean_loss + rng.gauss(0.0, 0.06 + 0.1 * (1 - t)), 5),
                   "tokens_per_s": round(3600 * (1 + rng.gauss(0.0, 0.03)), 1),
                   "lr": lr,
                   "aux_loss": round(0.01 * (1 + cv * cv), 6),
                   "z_loss": round(1e-3 * (2 + 8 * math.exp(-step / 300)), 6),
                   "grad_norm": round(abs(0.5 + 2.0 * math.exp(-step / 150) + rng.gauss(0.0, 0.05)), 4),
                   "expert_load": loads}
            if step % args.val_every == 0:
                val = mean_loss + 0.04 + rng.gauss(0.0, 0.01)
                rec["val_loss"] = round(val, 5)
                rec["val_bpb"] = round(val / math.log(2), 5)  # one token per byte
            fh.write(json.dumps(rec) + "\n")
        if args.partial:
            line = json.dumps({"step": args.steps + args.log_every, "loss": args.final_loss, "lr": 1e-4})
            fh.write(line[: len(line) // 2])
    print(path)


if __name__ == "__main__":
    main()
