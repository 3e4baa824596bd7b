#!/usr/bin/env python3
"""A large random bf16 OLMoE hub folder written with the standard library alone (no numpy, no
torch), for measuring `moe convert`'s host memory on a model of several GB.

usage: make-big-hub.py OUTDIR [--layers 24] [--hidden 1024] [--heads 16] [--kv-heads 8]
                       [--experts 32] [--top-k 8] [--intermediate 1024] [--vocab 32000]
                       [--context 4096]
                       [--shard-gb 2] [--seed 0]

The defaults give 2.55 B parameters, 5.1 GB in bf16. config.json is
tests/fixtures/hf/olmoe-tiny's with these sizes (and "dtype": "bfloat16"); the tensors are
those OlmoeForCausalLM saves (q/k RMSNorm over all heads, no biases, untied head), in shards
of at most --shard-gb GB with model.safetensors.index.json. Every tensor is a slice of one
block of 2^20 seeded N(0, 0.02) bf16 values taken from a rotating offset, so the values are
finite and differ between tensors, yet writing is as fast as the disk. No tokenizer: the
folder converts and runs on --prompt-ids.
"""
import argparse
import array
import json
import os
import random
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "olmoe-tiny", "config.json")
BLOCK = 1 << 20  # values in the random block


def bf16_block(seed):
    """2^20 N(0, 0.02) values as little-endian bf16 (the high halves of the f32s), twice over."""
    rng = random.Random(seed)
    f32 = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(BLOCK))).tobytes()
    out = bytearray(2 * BLOCK)
    out[0::2] = f32[2::4]
    out[1::2] = f32[3::4]
    return bytes(out) * 2  # any window of up to BLOCK values from any offset


def tensors(a):
    """(name, shape) in the order transformers saves them."""
    d, hd = a.hidden, a.hidden // a.heads
    yield "model.embed_tokens.weight", [a.vocab, d]
    for i in range(a.layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", [d]
        yield f"{p}.post_attention_layernorm.weight", [d]
        yield f"{p}.self_attn.q_proj.weight", [a.heads * hd, d]
        yield f"{p}.self_attn.k_proj.weight", [a.kv_heads * hd, d]
        yield f"{p}.self_attn.v_proj.weight", [a.kv_heads * hd, d]
        yield f"{p}.self_attn.o_proj.weight", [d, a.heads * hd]
        yield f"{p}.self_attn.q_norm.weight", [a.heads * hd]
        yield f"{p}.self_attn.k_norm.weight", [a.kv_heads * hd]
        yield f"{p}.mlp.gate.weight", [a.experts, d]
        for e in range(a.experts):
            yield f"{p}.mlp.experts.{e}.gate_proj.weight", [a.intermediate, d]
            yield f"{p}.mlp.experts.{e}.up_proj.weight", [a.intermediate, d]
            yield f"{p}.mlp.experts.{e}.down_proj.weight", [d, a.intermediate]
    yield "model.norm.weight", [d]
    yield "lm_head.weight", [a.vocab, d]


def nbytes(shape):
    n = 2
    for s in shape:
        n *= s
    return n


def shards(a):
    """Lists of (name, shape), each list at most shard-gb GB (a larger tensor alone)."""
    cap, cur, size = int(a.shard_gb * 1e9), [], 0
    for name, shape in tensors(a):
        if cur and size + nbytes(shape) > cap:
            yield cur
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes(shape)
    if cur:
        yield cur


def write_shard(path, items, block, offset):
    """One safetensors file; returns the next block offset."""
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [pos, pos + nbytes(shape)]}
        pos += nbytes(shape)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in items:
            left = nbytes(shape)
            while left:
                n = min(left, 2 * BLOCK)
                f.write(block[2 * offset:2 * offset + n])
                left -= n
                offset = (offset + 7919) % BLOCK
    return offset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    for flag, default in [("--layers", 24), ("--hidden", 1024), ("--heads", 16), ("--kv-heads", 8),
                          ("--experts", 32), ("--top-k", 8), ("--intermediate", 1024), ("--vocab", 32000),
                          ("--context", 4096), ("--seed", 0)]:
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    a = ap.parse_args()
    if a.hidden % a.heads or a.heads % a.kv_heads:
        ap.error("--heads must divide --hidden and --kv-heads must divide --heads")
    os.makedirs(a.outdir, exist_ok=True)
    with open(FIXTURE) as f:
        cfg = json.load(f)
    cfg.update({"hidden_size": a.hidden, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
                "num_experts": a.experts, "num_experts_per_tok": a.top_k, "intermediate_size": a.intermediate,
                "num_hidden_layers": a.layers, "vocab_size": a.vocab, "max_position_embeddings": a.context,
                "dtype": "bfloat16"})
    with open(os.path.join(a.outdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    block, offset, weight_map, total = bf16_block(a.seed), 0, {}, 0
    parts = list(shards(a))
    for i, items in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        offset = write_shard(os.path.join(a.outdir, fname), items, block, offset)
        for name, shape in items:
            weight_map[name] = fname
            total += nbytes(shape)
    with open(os.path.join(a.outdir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"{a.outdir}: {total / 2:.0f} parameters, {total / 1e9:.2f} GB of bf16 in {len(parts)} shards")


if __name__ == "__main__":
    main()
