#!/usr/bin/env python3
"""The transformers / tokenizers side of scripts/bench-hub.sh, beside `moe bench decode` and
`moe bench tokenize`.

usage:
  bench_hub_reference.py DIR --batch 1,16 --prompt-len P --tokens N [--reps R] [--cache dynamic|static]
                         [--device cuda|cpu]
  bench_hub_reference.py DIR --tokenize FILE [--reps R]

Decode: the hub folder through AutoModelForCausalLM in bf16 (f32 on the cpu). Per batch size B the
prompts are B x P ids from the generator that `moe bench decode` uses (a 64-bit LCG from
0x9E3779B97F4A7C15, id = (x >> 33) mod vocab, sequence after sequence), so both sides feed the
same ids. One untimed generate of N tokens first, then per timed run (median over --reps):
  prefill: one forward of the B prompts (use_cache, logits of the last position only);
  decode:  generate of N tokens minus generate of 1 token (greedy, min_new_tokens = max_new_tokens,
           so no early stop), over the N - 1 decode steps between them.
Prints
  PREFILL impl=transformers batch=B tokens=T ms=Z tokens_per_s=X peak_bytes=P
  DECODE impl=transformers batch=B tokens_per_s=X ms_per_step=Y bound_fraction=NA peak_bytes=P
with P = torch.cuda.max_memory_allocated() since the batch size began (the cpu: peak RSS).
bound_fraction is NA here: bench-hub.sh derives it from the moe side's bytes per step.

Tokenize: tokenizer.json through the `tokenizers` library on one thread (RAYON_NUM_THREADS=1,
TOKENIZERS_PARALLELISM=false), FILE split at newlines, empty lines left out, each line encoded
without special tokens (encode_batch, serial); one untimed pass, then --reps timed ones:
  TOKENIZE impl=tokenizers mb_per_s=X tokens=N bytes=B lines=L ms=T tokens_per_s=Y
"""
import argparse
import os
import resource
import statistics
import sys
import time

MASK64 = (1 << 64) - 1


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--batch", default="1,16", help="batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokenize", metavar="FILE", help="the tokenizer benchmark over FILE's lines instead")
    a = ap.parse_args()
    if a.tokens < 2 or a.prompt_len < 1 or a.reps < 1:
        ap.error("--tokens >= 2, --prompt-len >= 1, --reps >= 1")
    return a


def prompt_ids(B, P, V):
    """B x P ids, the generator of moe/cli/bench_decode.c."""
    x, ids = 0x9E3779B97F4A7C15, []
    for _ in range(B * P):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK64
        ids.append((x >> 33) % V)
    return [ids[b * P:(b + 1) * P] for b in range(B)]


def bench_tokenize(a):
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(a.dir, "tokenizer.json"))
    with open(a.tokenize, encoding="utf-8") as f:
        lines = [l for l in f.read().split("\n") if l]
    nbytes = sum(len(l.encode("utf-8")) for l in lines)
    tokens = sum(len(e.ids) for e in tok.encode_batch(lines, add_special_tokens=False))
    ms = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        tok.encode_batch(lines, add_special_tokens=False)
        ms.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(ms)
    print(f"TOKENIZE impl=tokenizers mb_per_s={nbytes / 1e3 / med:.3f} tokens={tokens} bytes={nbytes} "
          f"lines={len(lines)} ms={med:.2f} tokens_per_s={tokens * 1e3 / med:.0f}", flush=True)


class Decode:
    def __init__(self, a, torch, transformers):
        self.a, self.torch = a, torch
        self.cuda = a.device == "cuda"
        dtype = torch.bfloat16 if self.cuda else torch.float32
        t0 = time.perf_counter()
        auto = transformers.AutoModelForCausalLM
        try:  # straight onto the device; without accelerate, loaded on the host and moved
            self.model = auto.from_pretrained(a.dir, dtype=dtype, device_map=a.device).eval()
        except (ImportError, ValueError):
            self.model = auto.from_pretrained(a.dir, dtype=dtype).to(a.device).eval()
        self.V = self.model.config.vocab_size
        print(f"bench_hub_reference: {a.dir} on {a.device} {dtype}, transformers {transformers.__version__}, "
              f"torch {torch.__version__}, loaded in {time.perf_counter() - t0:.1f} s, cache {a.cache}",
              file=sys.stderr, flush=True)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def generate(self, ids, n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1, use_cache=True)
        if self.a.cache == "static":
            kw["cache_implementation"] = "static"
        return self.model.generate(ids, attention_mask=self.torch.ones_like(ids), **kw)

    def prefill(self, ids):
        return self.model(input_ids=ids, attention_mask=self.torch.ones_like(ids), use_cache=True, logits_to_keep=1)

    def peak(self):
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def batch(self, B):
        a, torch = self.a, self.torch
        ids = torch.tensor(prompt_ids(B, a.prompt_len, self.V), dtype=torch.long, device=a.device)
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            self.generate(ids, a.tokens)  # warm-up
            pre, step = [], []
            for _ in range(a.reps):
                pre.append(self.timed(lambda: self.prefill(ids)))
                one = self.timed(lambda: self.generate(ids, 1))
                full = self.timed(lambda: self.generate(ids, a.tokens))
                step.append((full - one) / (a.tokens - 1))
        T, p, s, peak = B * a.prompt_len, statistics.median(pre), statistics.median(step), self.peak()
        print(f"PREFILL impl=transformers batch={B} tokens={T} ms={p:.3f} tokens_per_s={1e3 * T / p:.2f} "
              f"peak_bytes={peak}", flush=True)
        print(f"DECODE impl=transformers batch={B} tokens_per_s={1e3 * B / s:.2f} ms_per_step={s:.4f} "
              f"bound_fraction=NA peak_bytes={peak}", flush=True)


def main():
    a = parse()
    if a.tokenize:
        return bench_tokenize(a)
    import torch
    import transformers
    d = Decode(a, torch, transformers)
    for B in [int(b) for b in a.batch.split(",") if b]:
        d.batch(B)


if __name__ == "__main__":
    main()
