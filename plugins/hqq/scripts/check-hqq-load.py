#!/usr/bin/env python3
"""Loads every Linear of a kvant HQQ checkpoint into hqq 0.2.8's own HQQLinear and compares its
dequantized weight with the original model's: proof that hqq reads kvant's layout.

    python check-hqq-load.py KVANT_HQQ_DIR ORIGINAL_DIR
"""
import json, os, sys

import torch
from safetensors.torch import load_file
from hqq.core.quantize import HQQLinear

quant, orig = load_file(os.path.join(sys.argv[1], "model.safetensors")), load_file(os.path.join(sys.argv[2], "model.safetensors"))
qc = json.load(open(os.path.join(sys.argv[1], "config.json")))["quantization_config"]["quant_config"]
modules = sorted({k.rsplit(".", 1)[0] for k in quant if k.endswith(".W_q")})
worst = 0.0
for m in modules:
    state = {k[len(m) + 1:]: v for k, v in quant.items() if k.startswith(m + ".")}
    layer = HQQLinear(None, qc, compute_dtype=state["scale"].dtype, device="cpu", initialize=False)
    layer.load_state_dict(state)
    w = orig[m + ".weight"].float()
    err = ((layer.dequantize().float() - w).norm() / w.norm()).item()
    worst = max(worst, err)
print(f"{len(modules)} modules loaded by HQQLinear; worst relative weight error {worst:.4f}")
