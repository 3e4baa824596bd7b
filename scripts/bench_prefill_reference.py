#!/usr/bin/env python3
"""Transformers' padded batched prefill, beside `moe bench prefill` on the same prompts.

N prompts with lengths drawn uniformly in [min, max] and random ids, from the same tiny
generator as moe/cli/bench_prefill.c (so both sides draw the same prompts, whatever
numpy's or C's rand would do):
    x = seed; each draw: x = (x * 6364136223846793005 + 1442695040888963407) mod 2^64,
    value = x >> 33; length = min + value % (max - min + 1) for all N prompts first, then
    the ids 1 + value % (vocab - 1), prompt after prompt (never 0, the pad id).
--max-len is clamped to the model's max_position_embeddings (4096 when absent), as the C
side clamps it to the model's context, and the output says so.

Batches of B prompts in order, left-padded with id 0 and an attention mask, then
  transformers-padded:   model(**batch) forward only (logits of the last position only
                         when the model takes logits_to_keep, as generate asks)
  transformers-generate: model.generate(**batch, max_new_tokens=1), the padded batched
                         generate a user runs
each after --warmup untimed passes, printing one line per mode
  PREFILL mode=M prompts=N real_tokens=R computed_tokens=C ms=T tokens_per_s=R/T peak_bytes=P ...
with P torch.cuda.max_memory_allocated() since the mode started (weights included).

Usage:
    python3 scripts/bench_prefill_reference.py DIR [--prompts N] [--min-len L] [--max-len L]
        [--seed S] [--batch B] [--warmup W] [--mode padded|generate|both]
        [--device cuda|cpu] [--dtype bf16|f32] [--dry-run]
--dry-run needs neither torch nor transformers: it prints the draw only,
  DRAW prompts=N real_tokens=R padded_tokens=C id_sum=I min_len=L max_len=L seed=S
(id_sum: the sum of every prompt id, which moe bench prefill prints too)
(bench-prefill.sh checks that both sides drew the same prompts).
"""
import argparse
import inspect
import json
import os
import sys
import time

MASK64 = (1 << 64) - 1


def lcg_draws(seed):
    x = seed & MASK64
    while True:
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK64
        yield x >> 33


def draw_prompts(n, lo, hi, vocab, seed):
    """The prompts' lengths [n] and ids (a list per prompt), as moe bench prefill draws them."""
    g = lcg_draws(seed)
    lens = [lo + next(g) % (hi - lo + 1) for _ in range(n)]
    ids = [[1 + next(g) % (vocab - 1) for _ in range(L)] for L in lens]
    return lens, ids


def batches(n, B):
    return [(i, min(n, i + B)) for i in range(0, n, B)]


def padded_tokens(lens, B):
    return sum((j - i) * max(lens[i:j]) for i, j in batches(len(lens), B))


def load_model(path, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM
    td = torch.bfloat16 if dtype == "bf16" else torch.float32
    import transformers
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # the older name before 4.56
    model = AutoModelForCausalLM.from_pretrained(path, **{key: td})
    return model.to(device).eval()


def make_batches(ids, lens, B, device):
    """Left-padded input_ids and attention_mask per batch of B prompts."""
    import torch
    out = []
    for i, j in batches(len(lens), B):
        L = max(lens[i:j])
        tok = torch.zeros((j - i, L), dtype=torch.long)
        mask = torch.zeros((j - i, L), dtype=torch.long)
        for q in range(i, j):
            tok[q - i, L - lens[q]:] = torch.tensor(ids[q])
            mask[q - i, L - lens[q]:] = 1
        out.append({"input_ids": tok.to(device), "attention_mask": mask.to(device)})
    return out


def run_mode(model, mode, bs, warmup, device):
    import torch
    kw = {}
    if mode == "padded" and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1

    def one_pass():
        with torch.no_grad():
            for b in bs:
                if mode == "padded":
                    model(**b, **kw)
                else:
                    model.generate(**b, max_new_tokens=1, do_sample=False, pad_token_id=0)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        one_pass()
    sync()
    t0 = time.perf_counter()
    one_pass()
    sync()
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return ms, peak, kw


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mode", choices=["padded", "generate", "both"], default="both")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    if a.min_len < 1 or a.min_len > a.max_len or a.prompts < 1 or a.batch < 1:
        sys.exit("bench_prefill_reference.py: need 1 <= --min-len <= --max-len, --prompts >= 1, --batch >= 1")
    with open(os.path.join(a.model_dir, "config.json")) as f:
        cfg = json.load(f)
    ctx = cfg.get("max_position_embeddings") or 4096
    if a.max_len > ctx:
        print(f"# --max-len {a.max_len} clamped to the model's context of {ctx} tokens", flush=True)
        a.max_len = ctx
    if a.min_len > a.max_len:
        print(f"# --min-len {a.min_len} clamped to {a.max_len}", flush=True)
        a.min_len = a.max_len
    lens, ids = draw_prompts(a.prompts, a.min_len, a.max_len, cfg["vocab_size"], a.seed)
    real, computed, id_sum = sum(lens), padded_tokens(lens, a.batch), sum(map(sum, ids))
    if a.dry_run:
        print(f"DRAW prompts={a.prompts} real_tokens={real} padded_tokens={computed} id_sum={id_sum} "
              f"min_len={a.min_len} max_len={a.max_len} seed={a.seed}")
        return
    import torch
    import transformers
    model = load_model(a.model_dir, a.device, a.dtype)
    bs = make_batches(ids, lens, a.batch, a.device)
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, attention "
          f"{getattr(model.config, '_attn_implementation', '?')}", file=sys.stderr)
    for mode in (["padded", "generate"] if a.mode == "both" else [a.mode]):
        ms, peak, kw = run_mode(model, mode, bs, a.warmup, a.device)
        print(f"PREFILL mode=transformers-{mode} prompts={a.prompts} real_tokens={real} computed_tokens={computed} "
              f"ms={ms:.2f} tokens_per_s={real / (ms / 1e3):.1f} peak_bytes={peak} device={a.device} "
              f"dtype={a.dtype} batch={a.batch} min_len={a.min_len} max_len={a.max_len} seed={a.seed} "
              f"id_sum={id_sum} logits_to_keep={kw.get('logits_to_keep', 'all')}", flush=True)


if __name__ == "__main__":
    main()
