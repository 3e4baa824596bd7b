#!/usr/bin/env python3
"""A random-weight OLMoE hub folder that transformers loads (OlmoeForCausalLM), for benchmarks.

usage: make-hub-model.py OUTDIR [--shape olmoe-1b-7b|small] [--dtype bf16|f32] [--seed S] [--device cuda|cpu]

Shapes:
  olmoe-1b-7b  the OLMoE-1B-7B shape: 16 layers, hidden 2048, 16 heads (no GQA), 64 experts of
               intermediate 1024, top-8, norm_topk_prob false, q/k RMSNorm, vocab 50304, context 4096
               (6.9 B parameters, 13.8 GB in bf16)
  small        the same architecture at ~50 MB in bf16 (4 layers, hidden 192, 6 heads, 16 experts of
               intermediate 128, top-4, vocab 50304), for a CPU smoke run

The model is built with transformers on --device (default: cuda when torch sees one), every matrix
drawn from N(0, 0.02) and every norm weight set to 1 with torch.nn.init on the --dtype tensors
(seeded: the same seed gives the same weights on the same device), and saved with save_pretrained
as safetensors shards of at most 5 GB with model.safetensors.index.json. The tokenizer is
tests/fixtures/hf/olmoe-tiny's (GPT-2 style byte-level BPE, 602 ids; they fit the 50304-id
vocabulary, whose other ids only the model knows), with its chat template and
tokenizer_config.json; config.json takes its end and pad ids (eos 0, pad 1, no bos).
Needs torch and transformers (the GPU machine's python has both).
"""
import argparse
import contextlib
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "hf", "olmoe-tiny")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]

SHAPES = {
    "olmoe-1b-7b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                        num_experts=64, intermediate_size=1024, num_experts_per_tok=8,
                        max_position_embeddings=4096),
    "small": dict(num_hidden_layers=4, hidden_size=192, num_attention_heads=6, num_key_value_heads=6,
                  num_experts=16, intermediate_size=128, num_experts_per_tok=4, max_position_embeddings=4096),
}


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe-1b-7b")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    return ap.parse_args()


def no_init():
    """transformers' context that skips the constructor's own initialisation (ours follows)."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            pass
    return contextlib.nullcontext()


def build(args, torch, transformers):
    cfg = transformers.OlmoeConfig(vocab_size=50304, rms_norm_eps=1e-5, norm_topk_prob=False,
                                   clip_qkv=None, attention_bias=False, tie_word_embeddings=False,
                                   router_aux_loss_coef=0.01, bos_token_id=None, eos_token_id=0, pad_token_id=1,
                                   **SHAPES[args.shape])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device), no_init():  # built in f32 (the constructor's own buffers as usual), then cast
        model = transformers.OlmoeForCausalLM(cfg)
    model = model.to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:  # input/post-attention/final norms and the q/k norms
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.normal_(p, mean=0.0, std=0.02, generator=g)
    return model, device


def main():
    args = parse()
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"make-hub-model.py: needs torch and transformers ({e})")
    t0 = time.time()
    model, device = build(args, torch, transformers)
    n = sum(p.numel() for p in model.parameters())
    os.makedirs(args.outdir, exist_ok=True)
    model.save_pretrained(args.outdir, max_shard_size="5GB")  # safetensors shards + index
    for f in TOKENIZER_FILES:
        src = os.path.join(TOKENIZER_DIR, f)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(args.outdir, f))
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 1
    model.generation_config.save_pretrained(args.outdir)
    files = sorted(os.listdir(args.outdir))
    print(f"make-hub-model.py: {args.outdir}: {args.shape}, {n / 1e9:.3f} B parameters in {args.dtype}, "
          f"made on {device} in {time.time() - t0:.0f} s (transformers {transformers.__version__}): {' '.join(files)}")


if __name__ == "__main__":
    main()
