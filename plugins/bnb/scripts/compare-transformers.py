#!/usr/bin/env python3
"""Loads a checkpoint kvant wrote with a bnb method into transformers + bitsandbytes and compares it with
transformers' own quantization of the same dense model: every tensor byte for byte, logits, perplexity.

    compare-transformers.py DENSE_MODEL KVANT_OUT [--text FILE] [--windows 8] [--window 512]

The settings come from KVANT_OUT/config.json's quantization_config; the dense weights are loaded in the
dtype of DENSE_MODEL's safetensors (quantize a BF16 folder to compare with transformers' BF16 NF4).
"""

import argparse
import json
import math
import os

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig


def weight_dtype(folder):
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for k in f.keys():
                    if k.endswith("proj.weight"):
                        return f.get_slice(k).get_dtype()
    raise SystemExit(f"no Linear weight found in {folder}")


def perplexity(model, ids, windows, window):
    nll, count, logits_all = 0.0, 0, []
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[:, w * window:(w + 1) * window]
            if chunk.shape[1] < window:
                break
            logits = model(chunk).logits.float()
            logits_all.append(logits)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll += loss.item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count), torch.cat(logits_all, dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dense")
    ap.add_argument("kvant_out")
    ap.add_argument("--text")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    a = ap.parse_args()

    qc = json.load(open(os.path.join(a.kvant_out, "config.json")))["quantization_config"]
    dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[weight_dtype(a.dense)]
    print(f"quantization_config: {json.dumps(qc)}")
    print(f"dense weights: {dt}")
    ref = AutoModelForCausalLM.from_pretrained(
        a.dense, quantization_config=BitsAndBytesConfig.from_dict(qc), dtype=dt, device_map="cpu")
    ours = AutoModelForCausalLM.from_pretrained(a.kvant_out, device_map="cpu")

    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    missing = sorted(set(sd_ref) - set(sd_ours))
    extra = sorted(set(sd_ours) - set(sd_ref))
    equal, differ = 0, []
    for k in sorted(set(sd_ref) & set(sd_ours)):
        r, o = sd_ref[k], sd_ours[k]
        # byte for byte, the quant_state JSON included
        same = r.dtype == o.dtype and r.shape == o.shape and torch.equal(r.view(torch.uint8), o.view(torch.uint8)) \
            if r.dtype != torch.bool else torch.equal(r, o)
        if same:
            equal += 1
        else:
            differ.append(k)
    print(f"tensors: {equal} identical, {len(differ)} differ, {len(missing)} missing, {len(extra)} extra")
    for k in differ[:10]:
        print(f"  differs: {k}")
    for k in missing[:5]:
        print(f"  missing: {k}")

    if a.text:
        tok = AutoTokenizer.from_pretrained(a.dense)
        ids = tok(open(a.text).read(), return_tensors="pt").input_ids
        ppl_ref, logits_ref = perplexity(ref, ids, a.windows, a.window)
        ppl_ours, logits_ours = perplexity(ours, ids, a.windows, a.window)
        print(f"perplexity ({a.windows} x {a.window} tokens): transformers {ppl_ref:.2f}, kvant checkpoint {ppl_ours:.2f}")
        print(f"logits: max |difference| {(logits_ref - logits_ours).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
