#!/usr/bin/env python3
"""Writes the seed inputs of fuzz_hf_tokenizer into corpus/: the two fixture tokenizers
(byte-level and SentencePiece-style) cut down to a small vocabulary, and variants of them
that use each normalizer, pre-tokenizer, post-processor and decoder tokenizer.json offers.
Run from anywhere: python3 tests/fuzz/hf_tokenizer/make_seeds.py"""
import copy
import json
import os

here = os.path.dirname(os.path.abspath(__file__))
fixtures = os.path.join(here, "..", "..", "fixtures", "hf")


def shrink(path, keep):
    """The fixture with its first `keep` vocab entries and the merges among them."""
    j = json.load(open(path, encoding="utf-8"))
    vocab = {t: i for t, i in j["model"]["vocab"].items() if i < keep}
    merges = []
    for m in j["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    j["model"]["vocab"], j["model"]["merges"] = vocab, merges
    j["added_tokens"] = [t for t in j["added_tokens"] if t["id"] < keep + 2] + [
        {"id": keep, "content": "<|im_start|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}]
    return j


def write(name, j):
    with open(os.path.join(here, "corpus", name), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))


byte_level = shrink(os.path.join(fixtures, "qwen3-moe-tiny", "tokenizer.json"), 300)
spm = shrink(os.path.join(fixtures, "mixtral-tiny", "tokenizer.json"), 330)
write("byte-level.json", byte_level)
write("sentencepiece.json", spm)

v = copy.deepcopy(byte_level)
v["normalizer"] = {"type": "Sequence", "normalizers": [
    {"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True},
    {"type": "Replace", "pattern": {"Regex": "\\s{2,}"}, "content": " "}, {"type": "NFD"}, {"type": "StripAccents"},
    {"type": "NFC"}, {"type": "NFKD"}]}
v["added_tokens"][-1].update(lstrip=True, rstrip=True, normalized=True, special=False)
write("normalizers.json", v)

v = copy.deepcopy(byte_level)
v["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"},
     "behavior": "Isolated", "invert": False},
    {"type": "Digits", "individual_digits": True}, {"type": "Punctuation", "behavior": "Contiguous"},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": False}]}
v["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|endoftext|>", 0], "cls": ["<|pad|>", 1],
                       "trim_offsets": True, "add_prefix_space": False}
write("split-sequence.json", v)

v = copy.deepcopy(byte_level)
v["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
    {"type": "WhitespaceSplit"}, {"type": "Split", "pattern": {"String": "e"}, "behavior": "MergedWithNext",
                                  "invert": True},
    {"type": "Split", "pattern": {"String": "a"}, "behavior": "MergedWithPrevious"},
    {"type": "Split", "pattern": {"String": "o"}, "behavior": "Removed"}, {"type": "Whitespace"},
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
v["post_processor"] = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "trim_offsets": False},
    {"type": "BertProcessing", "sep": ["<|endoftext|>", 0], "cls": ["<|pad|>", 1]}]}
v["added_tokens"].append({"id": 299, "content": "end", "single_word": True, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": False})
write("whitespace-split.json", v)

v = copy.deepcopy(spm)
v["normalizer"] = None
v["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
v["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
v["post_processor"] = {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                  {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                       "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                                          "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
write("metaspace.json", v)

v = copy.deepcopy(spm)
v["model"].update(continuing_subword_prefix="##", end_of_word_suffix="</w>", ignore_merges=True, fuse_unk=False,
                  byte_fallback=False)
v["decoder"] = {"type": "Sequence", "decoders": [{"type": "BPEDecoder", "suffix": "</w>"},
                                                  {"type": "Replace", "pattern": {"String": "##"}, "content": ""},
                                                  {"type": "Strip", "content": "\u2581", "start": 2, "stop": 1}]}
write("subword-prefix.json", v)
