#!/usr/bin/env python3
"""Reference fixtures for kvant's HQQ plugin, produced by the hqq library itself.

    /work/pyref/bin/python plugins/hqq/scripts/make-fixtures.py [MODEL_DIR]

Needs hqq==0.2.8 and torch. MODEL_DIR (default /work/dev-model) is an HF folder of SmolLM2-135M
in F32; slices of three of its Linear weights are the test matrices, plus a synthetic one with
outliers. Writes plugins/hqq/tests/fixtures/:
  reference.safetensors  per case `<w>.<nbits>_<group>_<axis>`: hqq's packed `W_q`, `scale`, `zero`
                         (compute dtype float32), for `v_proj` its unpacked codes `codes`; and the weights `<w>`
  reference.json         per case: hqq's and plain min-max's relative Frobenius error
  hqqlinear.safetensors  a whole HQQLinear state dict (4-bit g64 axis 1, float16, with bias): the
                         layout kvant must write, tensor for tensor
"""
import json, os, sys

import torch
from safetensors.torch import load_file, save_file
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")
CASES = [(4, 64, 0), (4, 64, 1), (3, 64, 0), (3, 64, 1), (2, 16, 0), (2, 16, 1)]


def min_max_error(w, nbits, gs, axis):
    wg = w.reshape(-1, gs) if axis == 1 else w.reshape(gs, -1)
    lo, hi = wg.min(axis, keepdim=True)[0], wg.max(axis, keepdim=True)[0]
    maxq = 2**nbits - 1
    s = maxq / (hi - lo)
    z = -lo * s
    r = ((wg * s + z).round().clamp(0, maxq) - z) / s
    return ((r.reshape(w.shape) - w).norm() / w.norm()).item()


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "/work/dev-model"
    sd = load_file(os.path.join(model, "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    outliers = torch.randn(64, 128, generator=gen) * 0.02
    outliers[torch.randint(0, 64, (12,), generator=gen), torch.randint(0, 128, (12,), generator=gen)] *= 25
    weights = {
        "q_proj": sd["model.layers.3.self_attn.q_proj.weight"][:64, :128].contiguous(),
        "down_proj": sd["model.layers.20.mlp.down_proj.weight"][:64, :192].contiguous(),
        "v_proj": sd["model.layers.11.self_attn.v_proj.weight"][:32, :128].contiguous(),
        "outliers": outliers,
    }
    tensors, errors = {}, {}
    for name, w in weights.items():
        tensors[name] = w
        for nbits, gs, axis in CASES:
            key = f"{name}.{nbits}_{gs}_{axis}"
            kw = dict(nbits=nbits, group_size=gs, axis=axis, optimize=True, round_zero=nbits == 4,
                      device="cpu", compute_dtype=torch.float32)
            w_q, meta = Quantizer.quantize(w, **kw)
            codes, _ = Quantizer.quantize(w, bitpack=False, **kw)
            meta["compute_dtype"] = torch.float32
            r = Quantizer.dequantize(w_q, meta)
            tensors[f"{key}.W_q"] = w_q
            if name == "v_proj":
                tensors[f"{key}.codes"] = codes.to(torch.uint8)
            tensors[f"{key}.scale"] = meta["scale"].float()
            tensors[f"{key}.zero"] = meta["zero"].float()
            errors[key] = {"hqq": ((r - w).norm() / w.norm()).item(), "min_max": min_max_error(w, nbits, gs, axis)}
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(errors, f, indent=1, sort_keys=True)

    linear = torch.nn.Linear(128, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weights["v_proj"])
        linear.bias.copy_(torch.randn(32, generator=gen) * 0.1)
    layer = HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=64, axis=1), compute_dtype=torch.float16,
                      device="cpu", del_orig=False)
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}
    save_file(state, os.path.join(OUT, "hqqlinear.safetensors"))
    for k, v in sorted(state.items()):
        print(f"{k:22} {str(v.dtype):15} {list(v.shape)}")
    for k, e in errors.items():
        print(f"{k:22} hqq {e['hqq']:.5f}  min-max {e['min_max']:.5f}")


if __name__ == "__main__":
    main()
