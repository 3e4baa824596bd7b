#!/usr/bin/env python3
"""Golden value for tests/test_cpu_golden.c: loads a checkpoint written by the test
(MOE_GOLDEN_DUMP=DIR) into the PyTorch reference LM of scripts/bench_reference.py and
prints its forward loss (cross-entropy + Switch aux averaged over layers) in float64.

    /usr/bin/python3 scripts/golden_reference.py DIR

Weight layout: ours multiply x @ W with W [in, out]; torch.nn.Linear stores [out, in].
"""
import os
import sys

import h5py
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_reference as ref  # noqa: E402


def main():
    d = sys.argv[1]
    f = h5py.File(os.path.join(d, "golden.h5"), "r")
    p = lambda name: torch.tensor(f["params/" + name][()], dtype=torch.float64)  # noqa: E731
    cfg = {k: v for k, v in (line.split(": ", 1) for line in f["config"][()].decode().splitlines()
                              if line.startswith("  ") and ": " in line)}
    num = lambda k: int(cfg["  " + k].split()[0])  # noqa: E731
    c = {"V": num("vocab_size"), "d": num("d_model"), "L": num("n_layers"), "H": num("n_heads"),
         "S": num("seq_len"), "E": num("n_experts"), "k": num("top_k"), "f": num("ffn_dim")}
    model = ref.LM(c).double()
    dm, fd = c["d"], c["f"]
    with torch.no_grad():
        model.embed.weight.copy_(p("embed"))
        model.norm.weight.copy_(p("final_norm"))
        for i, b in enumerate(model.blocks):
            b.attn_norm.weight.copy_(p(f"layers.{i}.attn_norm"))
            b.moe_norm.weight.copy_(p(f"layers.{i}.ffn_norm"))
            wqkv = p(f"layers.{i}.attn.wqkv")
            b.attn.q_proj.weight.copy_(wqkv[:, :dm].T)
            b.attn.k_proj.weight.copy_(wqkv[:, dm:2 * dm].T)
            b.attn.v_proj.weight.copy_(wqkv[:, 2 * dm:].T)
            b.attn.o_proj.weight.copy_(p(f"layers.{i}.attn.wo").T)
            b.moe.gate.weight.copy_(p(f"layers.{i}.moe.router.w_gate").T)
            for e, ex in enumerate(b.moe.experts):
                w13 = p(f"layers.{i}.moe.experts.{e}.w13")
                ex.w1.weight.copy_(w13[:, :fd].T)
                ex.w3.weight.copy_(w13[:, fd:].T)
                ex.w2.weight.copy_(p(f"layers.{i}.moe.experts.{e}.w2").T)
    with open(os.path.join(d, "tokens.txt")) as t:
        B, T = map(int, t.readline().split())
        pairs = [tuple(map(int, line.split())) for line in t]
    tokens = torch.tensor([a for a, _ in pairs]).view(B, T)
    targets = torch.tensor([b for _, b in pairs]).view(B, T)
    with torch.no_grad():
        print(f"{model(tokens, targets).item():.15f}")


if __name__ == "__main__":
    main()
