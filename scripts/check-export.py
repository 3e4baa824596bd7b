#!/usr/bin/env python3
"""Checks a hub folder written by `moe convert FILE.h5 --to-hf OUTDIR` in transformers.

    python3 scripts/check-export.py OUTDIR --moe build/moe [--ids 5,17,42] [--tol 1e-4]
    python3 scripts/check-export.py OUTDIR --logits FILE.safetensors [--tol 1e-4]

Loads OUTDIR with transformers' AutoModelForCausalLM (float32, eager attention, no remote
code), runs the ids (default: 32 ids drawn with a fixed seed) through it, runs
`moe logits --model OUTDIR --prompt-ids IDS --out FILE` and compares the two [T, V] logits.
Passes when max |transformers - moe| <= --tol (an absolute bound; the largest logit is
printed beside it). Also reports where the greedy (argmax) tokens differ. With --logits the
moe side is a file `moe logits --out` wrote elsewhere (its "input_ids" are the ids), for a
machine with transformers but no moe build.

Exit codes: 0 the logits agree; 1 they do not, or a step failed (the message says which);
2 the script cannot run here (torch / transformers missing). Needs torch and transformers;
the safetensors file moe writes is read by hand (no numpy needed on the moe side).
"""
import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile


def die(code, *lines):
    bar = '=' * 72
    print(bar, file=sys.stderr)
    for line in lines:
        print('check-export: ' + line, file=sys.stderr)
    print(bar, file=sys.stderr)
    sys.exit(code)


def read_f32(path, name):
    """Tensor `name` (F32) of a safetensors file: (shape, flat list of floats)."""
    with open(path, 'rb') as f:
        blob = f.read()
    n = struct.unpack('<Q', blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    if name not in header:
        die(1, 'FAIL: %s holds no tensor %r (it has %s)' % (path, name, sorted(k for k in header if k != '__metadata__')))
    entry = header[name]
    if entry['dtype'] != 'F32':
        die(1, 'FAIL: %s: tensor %r is %s, expected F32' % (path, name, entry['dtype']))
    begin, end = entry['data_offsets']
    raw = blob[8 + n + begin:8 + n + end]
    count = len(raw) // 4
    shape = entry['shape']
    want = 1
    for d in shape:
        want *= d
    if count != want:
        die(1, 'FAIL: %s: tensor %r has %d values for shape %s' % (path, name, count, shape))
    return shape, struct.unpack('<%df' % count, raw)


def moe_logits(moe, folder, ids):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'logits.safetensors')
        cmd = [moe, 'logits', '--model', folder, '--prompt-ids', ','.join(map(str, ids)), '--out', out]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            die(1, 'FAIL: `%s` exited %d:' % (' '.join(cmd), run.returncode), run.stderr.strip() or run.stdout.strip())
        return read_f32(out, 'logits')


def transformers_logits(folder, ids):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        die(2, 'cannot run here: %s (pip install torch transformers)' % e)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation='eager',
                                                     trust_remote_code=False)
    except Exception as e:  # a folder transformers refuses is itself a failed export
        die(1, 'FAIL: transformers cannot load %s: %s: %s' % (folder, type(e).__name__, e))
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].to(torch.float64)
    return logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    ap.add_argument('folder', help='the exported hub folder (config.json, model.safetensors)')
    ap.add_argument('--moe', default='build/moe', help='the moe program (default build/moe)')
    ap.add_argument('--logits', help='a file `moe logits --out` wrote (instead of running --moe)')
    ap.add_argument('--ids', help='comma-separated token ids (default: 32 random ids, seed 0)')
    ap.add_argument('--tol', type=float, default=1e-4, help='largest allowed |difference| (default 1e-4)')
    a = ap.parse_args()

    cfg_path = os.path.join(a.folder, 'config.json')
    if not os.path.isfile(cfg_path):
        die(1, 'FAIL: %s is missing' % cfg_path)
    with open(cfg_path) as f:
        cfg = json.load(f)
    vocab = int(cfg['vocab_size'])
    if a.logits:
        shape, ids = read_f32(a.logits, 'input_ids')
        ids = [int(x) for x in ids]
    elif a.ids:
        try:
            ids = [int(x) for x in a.ids.split(',')]
        except ValueError:
            die(1, 'FAIL: --ids %r is not a comma-separated list of integers' % a.ids)
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            die(1, 'FAIL: --ids must be non-empty and in [0, %d)' % vocab)
    else:
        n = min(32, int(cfg.get('max_position_embeddings', 32)))
        rng = random.Random(0)
        ids = [rng.randrange(vocab) for _ in range(n)]

    shape, ours = read_f32(a.logits, 'logits') if a.logits else moe_logits(a.moe, a.folder, ids)
    ref = transformers_logits(a.folder, ids)
    if list(ref.shape) != list(shape):
        die(1, 'FAIL: shapes differ: transformers %s, moe %s' % (list(ref.shape), shape))

    import torch
    mine = torch.tensor(ours, dtype=torch.float64).reshape(shape)
    diff = (mine - ref).abs()
    worst = float(diff.max())
    t, v = divmod(int(diff.argmax()), shape[1])
    scale = float(ref.abs().max())
    greedy = [i for i in range(shape[0]) if int(mine[i].argmax()) != int(ref[i].argmax())]
    print('check-export: %s (%s): %d positions x %d logits, max |diff| %.3g at position %d id %d '
          '(largest |logit| %.3g), tolerance %.3g' % (a.folder, cfg.get('model_type', '?'), shape[0], shape[1], worst, t,
                                                       v, scale, a.tol))
    if greedy:
        print('check-export: greedy tokens differ at positions %s' % greedy)
    if not worst <= a.tol:  # also catches NaN
        die(1, 'FAIL: the exported folder does not reproduce moe\'s logits in transformers',
            'max |diff| %.6g > tolerance %.3g (position %d, id %d: transformers %.6g, moe %.6g)'
            % (worst, a.tol, t, v, float(ref[t, v]), float(mine[t, v])))
    print('check-export: OK')


if __name__ == '__main__':
    main()
