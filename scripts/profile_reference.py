#!/usr/bin/env python3
"""Where the PyTorch reference's lm-train-gpu step spends its time, and what each form
of the transformers expert loop costs.

bench_reference.py's eager lm-train-gpu step is host-bound: its kernels take far less
than its step. This script times the step with three forms of the expert loop, each
alternating with the others over rounds on the same model, weights and data:
  loop    bench_reference.py's MoE.forward: counts.tolist() and one torch.where per
          expert (each a host sync), as transformers' Mixtral did up to 4.47;
  hf      transformers' current Mixtral loop: the experts hit found by one nonzero, then
          one torch.where per expert hit;
  split   one argsort by expert and one counts.tolist() per layer, the experts run on
          contiguous slices (one host sync per layer, the fewest an expert loop can have);
then profiles one form's step (torch.profiler): the kernels' time, the host syncs, and
the operators with the most host time.

Usage: python3 scripts/profile_reference.py [--rounds R] [--reps N] [--profile loop|hf|split]
Prints one JSON line per form and round, then the profile's summary; needs a CUDA GPU.
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_reference as ref  # noqa: E402


def expert_out(moe, e, x, tok, gate):
    """Expert e on the rows tok of x [T, d], scaled by gate [n]: [n, d]."""
    return moe.experts[e](x.index_select(0, tok)) * gate[:, None]


def forward_hf(moe, x):
    """transformers' current MixtralSparseMoeBlock loop (experts hit by one nonzero)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    gates, idx, _, aux = moe.route(x, True)
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(idx, moe.E).permute(2, 1, 0)  # (E, k, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, expert_out(moe, e, x, tok, gates[tok, slot]).to(x.dtype))
    return out.view(shape), aux


def forward_split(moe, x):
    """One argsort by expert and one host read of the counts per layer."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    gates, idx, counts, aux = moe.route(x, True)
    order = torch.argsort(idx.reshape(-1), stable=True)  # [T*k] copies by expert
    tok_all = order // moe.k                      # [T*k] their tokens
    gate_all = gates.reshape(-1).index_select(0, order)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            tok = tok_all[start:start + n]
            out.index_add_(0, tok, expert_out(moe, e, x, tok, gate_all[start:start + n]).to(x.dtype))
        start += n
    return out.view(shape), aux


FORMS = {"loop": ref.MoE.forward, "hf": forward_hf, "split": forward_split}


def profile_step(step, form):
    """Profiles 3 steps: per-step kernel time, host syncs and the top host operators."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    syncs = {e.key: e.count / 3 for e in events
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                          "cudaLaunchKernel", "cudaEventSynchronize")}
    print(json.dumps({"profile": form, "kernel_ms_per_step": round(kernel_us / 3e3, 2),
                      "runtime_calls_per_step": syncs}), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", choices=sorted(FORMS), default="loop")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_reference: needs a CUDA GPU")
    c = dict(ref.CASES["lm-train-gpu"], experts="loop", mm_dtype=torch.bfloat16)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cli = argparse.Namespace(device="cuda", compile=False)
    (_, step, flops, extra), = ref.bench_lm(c, cli, torch.device("cuda"), torch.bfloat16, gen)
    for r in range(args.rounds):
        for form, fwd in FORMS.items():
            ref.MoE.forward = fwd
            ms = ref.time_reps(step, "cuda", 2, args.reps)
            print(json.dumps({"round": r + 1, "form": form, "ms": round(statistics.median(ms), 2),
                              "ms_all": [round(t, 2) for t in ms],
                              "gpu": torch.cuda.get_device_name()}), flush=True)
    ref.MoE.forward = FORMS[args.profile]
    profile_step(step, args.profile)


if __name__ == "__main__":
    main()
