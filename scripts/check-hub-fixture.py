#!/usr/bin/env python3
"""Checks hub fixture folders against what transformers computed, through the moe CLI alone.

    python3 scripts/check-hub-fixture.py DIR [DIR ...] [--moe build/moe] [--device cpu|cuda]
                                         [--dtype f32|bf16] [--tol 1e-4]

A fixture folder is a hub folder made as tests/fixtures/hf/make_fixtures.py makes them:
the model files plus expected.safetensors, tokenizer_cases.json, chat_cases.json and
fixture.json. For each folder the script runs the commands a user runs and compares:
  logits     `moe logits --prompt-ids ROW0 --out F`: max |ours - theirs| / max |theirs|
             over the unpadded row's [24, V] logits <= --tol
  greedy     `moe generate --prompt-ids PROMPT --tokens N --temperature 0 --ignore-eos
             --print-ids`: the prompt and the N new ids equal transformers' greedy generation
  tokenizer  every case of tokenizer_cases.json: `moe tokenize --text` gives the ids (special
             tokens as the tokenizer adds them), `--decode IDS --skip-special` the text
  chat       every case of chat_cases.json: `moe tokenize --chat` gives the text and its ids
             (the generation prompt asked for except with Mixtral's template, as the fixtures
             were made)
It needs no torch or numpy: the safetensors files are read by hand. Use it on folders made
by the fixture script for other configurations (other sizes, dtypes, shard sizes): the
library's tests cover the five in tests/fixtures/hf.

Exit status: 0 when every check of every folder passes, 1 otherwise (each failure is
printed with its folder and check), 2 on bad arguments.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

DTYPES = {"F32": ("f", 4), "I64": ("q", 8), "I32": ("i", 4)}


def read_safetensors(path):
    """{name: (shape, flat list)} of a safetensors file's F32 / I64 / I32 tensors."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] not in DTYPES:
            continue
        code, size = DTYPES[t["dtype"]]
        a, b = t["data_offsets"]
        out[name] = (t["shape"], list(struct.unpack(f"<{(b - a) // size}{code}", data[a:b])))
    return out


class Checker:
    def __init__(self, args):
        self.args = args
        self.failures = 0

    def moe(self, *argv):
        """stdout of `moe ARGV --device D --dtype T` (a failed command raises with its stderr)."""
        cmd = [self.args.moe, *argv]
        if argv[0] in ("logits", "generate"):
            cmd += ["--device", self.args.device, "--dtype", self.args.dtype]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-400:]}")
        return r.stdout

    def report(self, folder, check, ok, detail):
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(folder.rstrip('/'))} {check}: {detail}", flush=True)
        self.failures += not ok

    def logits(self, d, exp):
        shape, ids = exp["input_ids"]
        T = shape[1]
        (_, _, V), want = exp["logits"]
        want = want[:T * V]  # row 0: no padding
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "logits.safetensors")
            self.moe("logits", "--model", d, "--prompt-ids", ",".join(map(str, ids[:T])), "--out", out)
            got = read_safetensors(out)["logits"][1]
        scale = max(abs(x) for x in want)
        err = max(abs(a - b) for a, b in zip(got, want)) / scale
        self.report(d, "logits", len(got) == len(want) and err <= self.args.tol,
                    f"rel err {err:.2e} over [{T}, {V}] (bar {self.args.tol:g})")

    def greedy(self, d, exp):
        prompt, want = exp["gen_prompt"][1], exp["gen_ids"][1]
        out = self.moe("generate", "--model", d, "--prompt-ids", ",".join(map(str, prompt)),
                       "--tokens", str(len(want) - len(prompt)), "--temperature", "0", "--ignore-eos", "--print-ids")
        got = [int(x) for x in out.strip().splitlines()[-1].split()[1:]]
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        ok = got == want
        self.report(d, "greedy", ok, f"{len(want) - len(prompt)} new ids equal" if ok else
                    f"first difference at position {first}, lengths {len(got)} / {len(want)}")

    def tokenizer(self, d):
        cases = json.load(open(os.path.join(d, "tokenizer_cases.json"), encoding="utf-8"))
        bad = []
        for i, c in enumerate(cases):
            ids = [int(x) for x in self.moe("tokenize", "--model", d, "--text", c["text"]).split()[1:]]
            text = self.moe("tokenize", "--model", d, "--decode", ",".join(map(str, c["ids"])), "--skip-special")
            if ids != c["ids"] or text[:-1] != c["decoded"]:
                bad.append(i)
        self.report(d, "tokenizer", not bad, f"{len(cases) - len(bad)} of {len(cases)} cases equal"
                    + (f" (differ: {bad})" if bad else ""))

    def chat(self, d):
        cases = json.load(open(os.path.join(d, "chat_cases.json"), encoding="utf-8"))
        family = json.load(open(os.path.join(d, "fixture.json")))["family"]
        bad = []
        for i, c in enumerate(cases):
            argv = ["tokenize", "--model", d, "--chat", json.dumps(c["messages"])]
            out = self.moe(*argv, *([] if family == "mixtral" else ["--generation-prompt"]))
            cut = out.rindex("\nIDS ")
            text, ids = out[:cut], [int(x) for x in out[cut + 5:].split()]
            if text != c["text"] or ids != c["ids"]:
                bad.append(i)
        self.report(d, "chat", not bad, f"{len(cases) - len(bad)} of {len(cases)} cases equal"
                    + (f" (differ: {bad})" if bad else ""))

    def folder(self, d):
        try:
            exp = read_safetensors(os.path.join(d, "expected.safetensors"))
        except (OSError, ValueError, KeyError) as e:
            self.report(d, "expected.safetensors", False, str(e))
            return
        for check in (lambda: self.logits(d, exp), lambda: self.greedy(d, exp), lambda: self.tokenizer(d),
                      lambda: self.chat(d)):
            try:
                check()
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                self.report(d, "run", False, str(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", metavar="DIR")
    ap.add_argument("--moe", default="build/moe", help="the moe program (default build/moe)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--tol", type=float, default=1e-4, help="logits bar, relative to the largest |logit|")
    args = ap.parse_args()
    if not os.access(args.moe, os.X_OK):
        ap.error(f"no moe program at {args.moe} (build it, or pass --moe)")
    c = Checker(args)
    for d in args.folders:
        c.folder(d)
    print(f"check-hub-fixture: {len(args.folders)} folder(s), {c.failures} failure(s)")
    sys.exit(1 if c.failures else 0)


if __name__ == "__main__":
    main()
