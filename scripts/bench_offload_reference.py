#!/usr/bin/env python3
"""The reference beside `moe bench offload`: a hub folder in transformers with accelerate's
offload. device_map="auto" with max_memory={0: G, "cpu": ...} keeps on the GPU the modules
that fit in G and leaves the rest (whole decoder layers) in host memory, copied to the GPU
for every forward. Greedy decode of the same pseudo-random prompts as the bench (its
generator, ids below the vocabulary), one line per batch size:

  OFFLOAD policy=transformers-accelerate budget=G batch=B tokens_per_s=X hit_rate=NA
          bytes_per_token=NA ttft_ms=Z peak_bytes=P gpu_layers=L/N

tokens/s counts as moe bench offload does: batch x tokens over the decode forwards, the
prefill apart (generate of tokens + 1 new ids minus generate of 1); ttft_ms is generate of
1 new id (the prefill); peak_bytes is torch's peak of allocated CUDA memory (the weights
it placed, activations, KV cache; not the CUDA context); gpu_layers: decoder layers placed
on the GPU. accelerate caps only the weights it places: activations and the KV cache come
on top of G (moe bench offload's budget holds everything).

Without torch with a GPU or transformers, or without accelerate where transformers needs it
for device_map, the line says tokens_per_s=NA and why (reason=...) and the exit status is
0; another failure prints NA lines with the reason and exits 1.

  python3 scripts/bench_offload_reference.py HUBDIR --max-gpu-memory 6GiB [--batch 1,8]
          [--tokens 32] [--prompt 32] [--cpu-memory SIZE]
"""
import argparse
import os
import re
import sys
import time

UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KiB": 1024, "M": 1e6, "MB": 1e6, "MiB": 1024 ** 2,
         "G": 1e9, "GB": 1e9, "GiB": 1024 ** 3, "T": 1e12, "TB": 1e12, "TiB": 1024 ** 4}


def parse_bytes(text):
    """'6GiB', '512MiB', '1.5G' or bytes -> int bytes (as moe's --gpu-memory reads them)."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)([A-Za-z]*)", text)
    if not m or m.group(2) not in UNITS:
        raise argparse.ArgumentTypeError("'%s' is not a size (e.g. 6GiB, 512MiB, 1.5G or bytes)" % text)
    return int(float(m.group(1)) * UNITS[m.group(2)])


def batches(text):
    try:
        out = [int(b) for b in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("--batch takes positive integers, e.g. 1 or 1,8")
    return out


def bench_prompts(batch, prompt, vocab):
    """moe bench offload's prompts: ids [batch, prompt] from its 64-bit LCG."""
    x, mask, ids = 0x9E3779B97F4A7C15, (1 << 64) - 1, []
    for _ in range(batch * prompt):
        x = (x * 6364136223846793005 + 1442695040888963407) & mask
        ids.append((x >> 33) % vocab)
    return [ids[b * prompt:(b + 1) * prompt] for b in range(batch)]


def line(args, batch, **fields):
    head = "OFFLOAD policy=transformers-accelerate budget=%d batch=%d" % (args.max_gpu_memory, batch)
    print(" ".join([head] + ["%s=%s" % kv for kv in fields.items()]), flush=True)


def not_available(args, why):
    for b in args.batch:
        line(args, b, tokens_per_s="NA", reason=re.sub(r"\s+", "_", why.strip())[:200])
    sys.exit(0)


def load(args, torch):
    from transformers import AutoModelForCausalLM
    cpu = args.cpu_memory or int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    kw = dict(device_map="auto", max_memory={0: args.max_gpu_memory, "cpu": cpu})
    try:
        model = AutoModelForCausalLM.from_pretrained(args.hubdir, dtype=torch.bfloat16, **kw)
    except TypeError:  # transformers before dtype= (4.56)
        model = AutoModelForCausalLM.from_pretrained(args.hubdir, torch_dtype=torch.bfloat16, **kw)
    model.eval()
    placed = getattr(model, "hf_device_map", None) or {"": 0}
    n = model.config.num_hidden_layers
    on_gpu = lambda dev: str(dev) not in ("cpu", "disk")  # noqa: E731
    per_layer = {}  # layer index -> all its modules on the GPU
    for name, dev in placed.items():
        m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
        if m:
            i = int(m.group(1))
            per_layer[i] = per_layer.get(i, True) and on_gpu(dev)
    if per_layer:
        gpu_layers = sum(per_layer.values())
    else:  # placed whole: every layer where the model is
        gpu_layers = n if all(on_gpu(d) for d in placed.values()) else 0
    return model, "%d/%d" % (gpu_layers, n)


def run_batch(args, torch, model, batch):
    vocab = model.config.vocab_size
    ids = torch.tensor(bench_prompts(batch, args.prompt, vocab), dtype=torch.long, device="cuda:0")
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=pad, use_cache=True)
        torch.cuda.synchronize()
        assert out.shape == (batch, args.prompt + new), "generate gave %s" % (tuple(out.shape),)
        return time.perf_counter() - t

    generate(2)  # warm-up: kernels, the hooks' first copies
    torch.cuda.reset_peak_memory_stats()
    first = generate(1)
    full = generate(args.tokens + 1)
    return batch * args.tokens / (full - first), first * 1e3, torch.cuda.max_memory_allocated()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hubdir", help="a hub folder (config.json, safetensors)")
    ap.add_argument("--max-gpu-memory", type=parse_bytes, required=True, help="GPU cap for the weights (e.g. 6GiB)")
    ap.add_argument("--cpu-memory", type=parse_bytes, default=None, help="host cap (default: 80%% of RAM)")
    ap.add_argument("--batch", type=batches, default=[1], help="sequences decoded together; a list runs each")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per sequence (decode steps timed)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.hubdir, "config.json")):
        ap.error("%s: no config.json there" % args.hubdir)
    try:
        import torch
    except ImportError as e:
        not_available(args, "torch not importable: %s" % e)
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        not_available(args, "transformers not importable: %s" % e)
    try:
        import accelerate
        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None  # transformers may still place with device_map; if not, NA below
    if not torch.cuda.is_available():
        not_available(args, "no CUDA device for torch")
    done = 0
    try:
        try:
            model, gpu_layers = load(args, torch)
        except (ImportError, ValueError) as e:
            if accelerate_version is None and "accelerate" in str(e):  # exits 0 (SystemExit passes below)
                not_available(args, "accelerate not importable and device_map=auto needs it: %s" % e)
            raise
        for b in args.batch:
            tps, ttft, peak = run_batch(args, torch, model, b)
            line(args, b, tokens_per_s="%.2f" % tps, hit_rate="NA", bytes_per_token="NA", ttft_ms="%.2f" % ttft,
                 peak_bytes=peak, gpu_layers=gpu_layers)
            done += 1
    except Exception as e:  # noqa: BLE001 - the table shows the reason, the status says it failed
        for b in args.batch[done:]:
            line(args, b, tokens_per_s="NA", reason=re.sub(r"\s+", "_", ("%s: %s" % (type(e).__name__, e)))[:200])
        raise
    print("reference: transformers %s, accelerate %s, torch %s, device map %s" % (
        transformers.__version__, accelerate_version, torch.__version__, getattr(model, "hf_device_map", None)),
        file=sys.stderr)


if __name__ == "__main__":
    main()
