#!/usr/bin/env python3
"""Writes the seed inputs of fuzz_safetensors into corpus/: small files with each dtype,
scalar and empty tensors, metadata, and an index followed by a NUL byte and its shard (the
harness writes that shard as model-00001-of-00001.safetensors).
Run from anywhere: python3 tests/fuzz/safetensors/make_seeds.py"""
import json
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}


def safetensors(tensors, metadata=None, pad=0):
    """tensors: [(name, dtype, shape)] laid out in order; values are byte patterns."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((i * 37 + 11) % 256 for i in range(n))
    h = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + data


def write(name, blob):
    with open(os.path.join(here, "corpus", name), "wb") as f:
        f.write(blob)


write("f32.safetensors", safetensors([("w", "F32", [2, 3]), ("b", "F32", [3])], {"format": "pt"}))
write("halves.safetensors", safetensors([("h", "F16", [4]), ("bf", "BF16", [2, 2]), ("s", "BF16", [])], pad=5))
write("ints.safetensors", safetensors([("i64", "I64", [3]), ("i32", "I32", [1, 2, 1]), ("e", "I32", [0, 7])]))
write("empty.safetensors", safetensors([]))
shard = safetensors([("model.embed_tokens.weight", "F32", [4, 2]), ("lm_head.weight", "BF16", [2, 4])])
index = {"metadata": {"total_size": 48}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors",
                                                        "lm_head.weight": "model-00001-of-00001.safetensors"}}
write("index.bin", json.dumps(index, indent=1).encode() + b"\0" + shard)
