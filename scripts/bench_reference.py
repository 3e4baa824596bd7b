#!/usr/bin/env python3
"""PyTorch reference for the side-by-side benchmarks in results/README.md.

An HF-Mixtral-style MoE (softmax router in fp32, top-k, renormalised gates,
SwiGLU experts) inside a pre-norm RMSNorm transformer with RoPE causal
attention, trained with AdamW. The model matches the one the `moe` framework
builds, so both sides of a comparison do the same arithmetic on the same shapes.
--experts picks how the experts run: "loop" (default) is the transformers
Mixtral loop, one expert after another with index_select / index_add_ and a
host sync per expert; "grouped_mm" is the torchtitan path: the T*k token
copies sorted by expert, every expert in one torch._grouped_mm per projection
(bf16, stacked weights), no host sync (needs torch >= 2.8; sm90 for the fast
bf16 kernel).

Usage:
    python3 scripts/bench_reference.py CASE [--device cpu|cuda] [--dtype f32|bf16]
        [--threads N] [--warmup W] [--reps R] [--compile] [--experts loop|grouped_mm]
CASE: moe-layer-cpu, lm-step-cpu, moe-layer-gpu, moe-layer-gpu-fine, lm-train-gpu.
Layer cases time "fwd" (no_grad) and "fwd_bwd"; LM cases time "step"
(zero_grad, forward, backward, AdamW step). One JSON line per figure on
stdout; the configuration goes to stderr. Runs on PyTorch 1.13 and 2.x.

On the GPU this eager reference is host-bound (a profile of lm-train-gpu showed
~99 ms of kernels in a ~200-300 ms step), so its times move with the host CPU:
compare only against figures taken in the same run on the same machine.
"""
import argparse
import inspect
import json
import math
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Shapes exactly as in results/README.md's table of cases.
CASES = {
    "moe-layer-cpu": dict(kind="layer", device="cpu", dtype="f32", d=256, f=704, E=8, k=2, T=4096),
    "lm-step-cpu": dict(kind="lm", device="cpu", dtype="f32", V=256, d=256, L=4, H=4, E=8, k=2,
                        f=704, B=8, S=256),
    "moe-layer-gpu": dict(kind="layer", device="cuda", dtype="bf16", d=1024, f=2816, E=8, k=2, T=16384),
    "moe-layer-gpu-fine": dict(kind="layer", device="cuda", dtype="bf16", d=2048, f=1408, E=64, k=6,
                               T=16384),
    "lm-train-gpu": dict(kind="lm", device="cuda", dtype="bf16", V=32768, d=1024, L=8, H=16, E=8, k=2,
                         f=2816, B=16, S=1024),
}
AUX_ALPHA = 0.01          # Switch load-balancing loss weight (router/README.md §1)
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
INIT_STD = 0.02           # every weight matrix, embedding included; norm weights start at 1
H200_BF16_PEAK = 790e12   # measured cuBLAS bf16 GEMM rate: the MFU denominator (results/README.md)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention, bias-free projections, HF-Llama RoPE."""

    def __init__(self, d, n_heads, max_seq):
        super().__init__()
        self.h, self.hd = n_heads, d // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, self.hd, 2).float() / self.hd))
        freqs = torch.outer(torch.arange(max_seq).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = (p(x).view(B, S, self.h, self.hd).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.cos[:S].to(q.dtype), self.sin[:S].to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if hasattr(F, "scaled_dot_product_attention"):  # torch >= 2.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            p = F.softmax(s.masked_fill(mask, float("-inf")), dim=-1, dtype=torch.float32)
            y = p.to(v.dtype) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, S, d))


class Expert(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Sparse MoE block (HF Mixtral routing); returns (output, Switch aux loss).

    experts="loop": nn.Linear experts run one after another (the transformers loop).
    experts="grouped_mm": the same SwiGLU experts as stacked parameters
    w13 [E, d, 2f] (w1 | w3 side by side) and w2 [E, f, d], run by torch._grouped_mm
    in mm_dtype (the run's dtype: bf16 under autocast or for bf16 models); same
    parameter count, same maths."""

    def __init__(self, d, f, E, k, experts="loop", mm_dtype=torch.bfloat16):
        super().__init__()
        self.E, self.k, self.f, self.kind, self.mm_dtype = E, k, f, experts, mm_dtype
        self.gate = nn.Linear(d, E, bias=False)
        if experts == "grouped_mm":
            self.w13 = nn.Parameter(torch.empty(E, d, 2 * f))
            self.w2 = nn.Parameter(torch.empty(E, f, d))
        else:
            self.experts = nn.ModuleList(Expert(d, f) for _ in range(E))

    def route(self, x, counts_on_device):
        """x [T, d] -> gates [T, k] (x's dtype), idx [T, k], counts [E] int64, Switch aux loss.
        counts_on_device: count by a scatter-add (CUDA bincount reads its max back to the
        host, and torch.compile breaks its graph on it), else by bincount as HF does."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        gates, idx = torch.topk(probs, self.k, dim=-1)
        gates = (gates / gates.sum(dim=-1, keepdim=True)).to(x.dtype)
        if counts_on_device:
            flat = idx.reshape(-1)
            counts = torch.zeros(self.E, dtype=torch.int64, device=x.device).scatter_add_(
                0, flat, torch.ones_like(flat))
        else:
            counts = torch.bincount(idx.flatten(), minlength=self.E)
        # aux = α·E·Σ_e f_e·P_e; f_e = share of the T·k assignments (no grad), P_e = mean prob.
        f_e = counts.float() / idx.numel()
        return gates, idx, counts, AUX_ALPHA * self.E * (f_e * probs.mean(0)).sum()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, idx, counts, aux = self.route(x, self.kind == "grouped_mm")
        if self.kind == "grouped_mm":
            return self.grouped(x, gates, idx, counts).view(shape), aux
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.E).permute(2, 1, 0)  # (E, k, T)
        # The classic HF loop: counts.tolist() and each torch.where wait for the device, as in HF.
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            slot, tok = torch.where(mask[e])
            y = self.experts[e](x.index_select(0, tok)) * gates[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out.view(shape), aux

    def grouped(self, x, gates, idx, counts):
        """Experts by grouped GEMMs: x [T, d], gates [T, k] (x's dtype), idx [T, k],
        counts [E] -> [T, d]. No host sync: offsets stay on the device."""
        order = torch.argsort(idx.reshape(-1), stable=True)  # [T*k] copies by expert, token order kept
        tok = order // self.k                                 # [T*k] token of each sorted copy
        xs = x.index_select(0, tok).to(self.mm_dtype)         # [T*k, d]
        offs = torch.cumsum(counts, 0, dtype=torch.int32)     # [E] end row of each expert's group
        h13 = torch._grouped_mm(xs, self.w13.to(self.mm_dtype), offs=offs)  # [T*k, 2f]
        h = F.silu(h13[:, :self.f]) * h13[:, self.f:]                        # [T*k, f]
        y = torch._grouped_mm(h, self.w2.to(self.mm_dtype), offs=offs)      # [T*k, d]
        y = y * gates.reshape(-1).index_select(0, order)[:, None]            # [T*k, d]
        return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn_norm, self.moe_norm = RMSNorm(c["d"]), RMSNorm(c["d"])
        self.attn = Attention(c["d"], c["H"], c["S"])
        self.moe = MoE(c["d"], c["f"], c["E"], c["k"], c["experts"], c["mm_dtype"])

    def forward(self, x):
        h = x + self.attn(self.attn_norm(x))
        m, aux = self.moe(self.moe_norm(h))
        return h + m, aux


class LM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(c["V"], c["d"])
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["L"]))
        self.norm = RMSNorm(c["d"])

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        auxes = []
        for b in self.blocks:
            x, aux = b(x)
            auxes.append(aux)
        logits = F.linear(self.norm(x), self.embed.weight)  # LM head tied to the embedding
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return ce + torch.stack(auxes).mean()  # aux averaged over MoE layers


def init_weights(model):
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
        elif isinstance(m, MoE) and m.kind == "grouped_mm":  # stacked experts: the same law
            nn.init.normal_(m.w13, mean=0.0, std=INIT_STD)
            nn.init.normal_(m.w2, mean=0.0, std=INIT_STD)


def make_adamw(params, device):
    kw = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if device == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kw["fused"] = True  # torch >= 2.0
    return torch.optim.AdamW(params, **kw), kw.get("fused", False)


def time_reps(fn, device, warmup, reps):
    """Run fn warmup times, then time reps runs; returns per-rep milliseconds."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in ev:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_bytes(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    # ru_maxrss is KiB on Linux: the process's peak RSS so far, not per phase.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"


def lm_flops(c):
    """FLOPs of one training step, per results/README.md's MFU definition:
    6 · (active matmul params) · tokens + causal attention FLOPs, where
      active matmul params = L · (4·d² [q,k,v,o] + d·E [router] + k·3·d·f [active experts])
                             + V·d [LM head; the embedding lookup is not a matmul],
      attention = 6 · L · B · S² · d  (QKᵀ and PV: 4·S²·d per layer and sequence
                  forward, halved by the causal mask, ×3 for forward + backward)."""
    per_layer = 4 * c["d"] ** 2 + c["d"] * c["E"] + c["k"] * 3 * c["d"] * c["f"]
    active = c["L"] * per_layer + c["V"] * c["d"]
    tokens = c["B"] * c["S"]
    return 6 * active * tokens + 6 * c["L"] * c["B"] * c["S"] ** 2 * c["d"], active


def bench_layer(c, args, dev, dtype, gen):
    moe = MoE(c["d"], c["f"], c["E"], c["k"], c["experts"], c["mm_dtype"])
    init_weights(moe)
    moe = moe.to(device=dev, dtype=dtype)
    x = torch.randn(c["T"], c["d"], generator=gen).to(device=dev, dtype=dtype)
    r = torch.randn(c["T"], c["d"], generator=gen).to(device=dev, dtype=dtype)
    fn = torch.compile(moe) if args.compile else moe
    xg = x.clone().requires_grad_(True)  # the backward also computes dX, as in a real stack

    def fwd():
        with torch.no_grad():
            fn(x)

    def fwd_bwd():  # parameter (and input) grads accumulate across reps, never freed
        out, _ = fn(xg)
        (out * r).sum().backward()

    flops = 2 * c["T"] * c["k"] * 3 * c["d"] * c["f"]  # SwiGLU experts only; router excluded
    return [("fwd", fwd, flops, {}), ("fwd_bwd", fwd_bwd, 3 * flops, {})]


def bench_lm(c, args, dev, dtype, gen):
    model = LM(c)
    init_weights(model)
    model = model.to(dev)  # f32 master weights; bf16 via autocast
    opt, fused = make_adamw(model.parameters(), args.device)
    data = torch.randint(0, c["V"], (c["B"], c["S"] + 1), generator=gen).to(dev)
    tokens, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    fn = torch.compile(model) if args.compile else model
    use_amp = dtype == torch.bfloat16

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=use_amp):
            loss = fn(tokens, targets)
        loss.backward()
        opt.step()

    flops, active = lm_flops(c)
    return [("step", step, flops, {"tokens": c["B"] * c["S"], "active_matmul_params": active,
                                   "fused_adamw": fused, "amp": use_amp})]


def check_grouped_mm(c, device):
    """Exits unless torch._grouped_mm can run the case's expert GEMMs."""
    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"bench_reference: --experts grouped_mm needs torch._grouped_mm (torch >= 2.8); "
                 f"this is torch {torch.__version__}")
    # _grouped_mm's kernel loads its operands by TMA: every row stride 16-byte aligned and, as its
    # input checks demand, the contraction and output dims (d, f, 2f) multiples of 16.
    bad = [f"{n}={c[n]}" for n in ("d", "f") if c[n] % 16]
    if bad:
        sys.exit(f"bench_reference: --experts grouped_mm needs d and f multiples of 16 "
                 f"(torch._grouped_mm), case {c} has {', '.join(bad)}")
    if device != "cuda" or torch.cuda.get_device_capability() < (9, 0) or c["mm_dtype"] != torch.bfloat16:
        print("bench_reference: torch._grouped_mm's fused kernel needs bf16 on sm90+; "
              "this run takes its per-expert fallback", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: the case's device")
    ap.add_argument("--dtype", choices=["f32", "bf16"], help="default: the case's dtype")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    ap.add_argument("--experts", choices=["loop", "grouped_mm"], default="loop",
                    help="loop: transformers' expert loop; grouped_mm: torch._grouped_mm (torchtitan)")
    args = ap.parse_args()
    c = dict(CASES[args.case])
    args.device = args.device or c["device"]
    args.dtype = args.dtype or c["dtype"]
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --reps >= 1, --warmup >= 0, --threads >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench_reference: case {args.case} needs CUDA, but torch {torch.__version__} "
                 f"sees no CUDA device (built with CUDA {torch.version.cuda}); "
                 "run it on a GPU machine or pass --device cpu")
    if args.compile and not hasattr(torch, "compile"):
        sys.exit(f"bench_reference: --compile needs torch >= 2.0, this is {torch.__version__}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    c["experts"], c["mm_dtype"] = args.experts, dtype
    if args.experts == "grouped_mm":
        check_grouped_mm(c, args.device)
    torch.manual_seed(0)  # weights
    gen = torch.Generator().manual_seed(1)  # inputs, drawn on the CPU so every device sees the same data
    print(f"bench_reference: {args.case} {c} device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}", file=sys.stderr)

    phases = (bench_layer if c["kind"] == "layer" else bench_lm)(c, args, dev, dtype, gen)
    for phase, fn, flops, extra in phases:
        ms_all = time_reps(fn, args.device, args.warmup, args.reps)
        ms = statistics.median(ms_all)
        peak, peak_kind = peak_bytes(args.device)
        rec = {"case": args.case, "phase": phase, "ms": round(ms, 4),
               "ms_all": [round(t, 4) for t in ms_all], "flops": flops,
               "gflops_per_s": round(flops / (ms * 1e-3) / 1e9, 2),
               "peak_bytes": peak, "peak_kind": peak_kind, "torch": torch.__version__,
               "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "compile": args.compile, "experts": args.experts, "warmup": args.warmup,
               "reps": args.reps}
        rec.update(extra)
        if "tokens" in extra:
            rec["tokens_per_s"] = round(extra["tokens"] / (ms * 1e-3), 1)
            if args.device == "cuda":
                rec["mfu"] = round(flops / (ms * 1e-3) / H200_BF16_PEAK, 4)
        if args.device == "cuda":
            rec["gpu"] = torch.cuda.get_device_name()
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
