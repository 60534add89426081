#!/usr/bin/env python3
"""Generate the bitsandbytes reference fixtures for kvant-bnb's tests.

Runs bitsandbytes on the CPU over small, deliberately awkward inputs and saves the inputs
and everything bitsandbytes produced, so the Rust tests can compare byte for byte without torch.

    /work/pyref/bin/python plugins/bnb/scripts/make-fixtures.py [OUT_DIR]

Writes OUT_DIR/fixtures.safetensors (tensors named `<case>.<item>`) and OUT_DIR/cases.json
(one entry per case: its parameters, plus the bitsandbytes / torch versions).
"""

import json
import math
import os
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

torch.manual_seed(1234)
tensors = {}
cases = []


def weights(shape, dtype, scale=0.02):
    """Normal weights with a few large outliers, as real checkpoints have."""
    w = torch.randn(shape) * scale
    flat = w.view(-1)
    k = max(1, flat.numel() // 97)
    idx = torch.randperm(flat.numel())[:k]
    flat[idx] *= 8
    return w.to(dtype)


def midpoints(quant_type):
    code = F.get_4bit_type(quant_type, device="cpu")
    s = torch.sort(code).values
    return (s[:-1] + s[1:]) / 2


def tie_weights(n, dtype):
    """Every NF4 and FP4 decision boundary, exactly and one ulp either side, next to a 1.0 that
    makes it the block's absmax. Fills n elements (repeating)."""
    vals = []
    for qt in ("nf4", "fp4"):
        for m in midpoints(qt):
            vals += [m, torch.nextafter(m, torch.tensor(2.0)), torch.nextafter(m, torch.tensor(-2.0))]
    vals = torch.stack(vals).float()
    # absmax 1 in every 32-element block
    out = []
    i = 0
    while len(out) < n:
        if len(out) % 32 == 0:
            out.append(1.0 if (len(out) // 32) % 2 == 0 else -1.0)
        else:
            out.append(vals[i % len(vals)].item())
            i += 1
    return torch.tensor(out[:n]).to(dtype)


def put(case, item, t):
    tensors[f"{case}.{item}"] = t.contiguous()


def four_bit_case(name, quant_type, dtype, shape, blocksize, double_quant, w=None):
    dt = DTYPES[dtype]
    if w is None:
        w = weights(shape, dt)
    w = w.reshape(shape).to(dt)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    put(name, "input", w)
    put(name, "weight", packed)
    for k, v in qs.as_dict(packed=True).items():
        put(name, k, v)
    entry = dict(name=name, kind="4bit", quant_type=quant_type, dtype=dtype, shape=list(shape),
                 blocksize=blocksize, double_quant=double_quant)
    if double_quant:
        # the exact offset, as f32 bits, to separate summation-order effects from the rest
        entry["offset_bits"] = int(qs.offset.float().view(torch.int32).item()) & 0xFFFFFFFF
    # dequantized into the original dtype, as transformers does
    put(name, "dequant", F.dequantize_4bit(packed, qs))
    if double_quant:
        put(name, "absmax_dequant", F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset)
    cases.append(entry)


def int8_case(name, dtype, shape, w=None):
    dt = DTYPES[dtype]
    if w is None:
        w = weights(shape, dt, scale=0.05)
    w = w.reshape(shape).to(dt)
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    p = p._quantize("cpu")
    put(name, "input", w)
    put(name, "weight", p.data)
    put(name, "SCB", p.SCB)
    put(name, "dequant_f32", F.int8_vectorwise_dequant(p.data, p.SCB))
    # forward with the outlier decomposition, batch 3, one column well over the threshold
    x = (torch.randn(3, shape[1]) * 0.5).to(torch.float16 if dt == torch.float32 else dt)
    x[:, shape[1] // 3] *= 40.0
    lin = bnb.nn.Linear8bitLt(shape[1], shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    lin.weight = p
    lin.eval()  # inference takes the int8 path (MatMul8bitLt); training mode dequantizes instead
    with torch.no_grad():
        y = lin(x)
    put(name, "x", x)
    put(name, "y", y)
    cases.append(dict(name=name, kind="int8", dtype=dtype, shape=list(shape), threshold=6.0))


def blockwise8_case(name, x, blocksize):
    q, qs = F.quantize_blockwise(x, blocksize=blocksize)
    put(name, "input", x)
    put(name, "q", q)
    put(name, "absmax", qs.absmax)
    put(name, "code", qs.code)
    cases.append(dict(name=name, kind="blockwise8", shape=list(x.shape), blocksize=blocksize))


for qt in ("nf4", "fp4"):
    four_bit_case(f"{qt}_f32_odd_single_partial", qt, "F32", [7, 9], 64, False)
    four_bit_case(f"{qt}_f32_partial_dq", qt, "F32", [5, 130], 64, True)
    four_bit_case(f"{qt}_bf16_bs32_dq_odd", qt, "BF16", [33, 65], 32, True)
    four_bit_case(f"{qt}_f16_bs128", qt, "F16", [16, 100], 128, False)
    four_bit_case(f"{qt}_bf16_bs4096_dq", qt, "BF16", [1, 5001] if qt == "fp4" else [3, 3001], 4096, True)
    four_bit_case(f"{qt}_bf16_two_nested_blocks", qt, "BF16", [40, 260], 32, True)
    four_bit_case(f"{qt}_f32_bs256_dq", qt, "F32", [4, 300], 256, True)
    four_bit_case(f"{qt}_bf16_bs1024", qt, "BF16", [2, 1500], 1024, False)
    four_bit_case(f"{qt}_bf16_bs2048_dq", qt, "BF16", [1, 5000], 2048, True)
    four_bit_case(f"{qt}_bf16_bs512_dq", qt, "BF16", [3, 700], 512, True)
    # zero blocks: a full block of zeros and an all-zero last partial block
    z = weights([5, 70], torch.float32)
    z.view(-1)[64:128] = 0
    z.view(-1)[320:] = 0
    four_bit_case(f"{qt}_f32_zero_blocks_dq", qt, "F32", [5, 70], 64, True, w=z)
    four_bit_case(f"{qt}_bf16_zero_blocks", qt, "BF16", [5, 70], 64, False, w=z)
    four_bit_case(f"{qt}_f32_all_zero_dq", qt, "F32", [4, 32], 32, True, w=torch.zeros(4, 32))
    # exact ties between two codes
    four_bit_case(f"{qt}_f32_ties", qt, "F32", [9, 31], 32, True, w=tie_weights(9 * 31, torch.float32))
    four_bit_case(f"{qt}_f32_ties_bs64", qt, "F32", [5, 29], 64, False, w=tie_weights(5 * 29, torch.float32))
    grid = (torch.arange(-128, 128, dtype=torch.float32) / 128.0)  # k/128: bf16-exact, hits FP4 bounds
    four_bit_case(f"{qt}_bf16_grid", qt, "BF16", [4, 64], 64, False, w=grid.to(torch.bfloat16))

int8_case("int8_f32", "F32", [6, 50])
int8_case("int8_bf16", "BF16", [5, 33])
int8_case("int8_f16", "F16", [4, 16])
# round-half-to-even ties (row max 127 -> scale 1) and a row that only fp16 rounding changes
t = torch.zeros(4, 8)  # row 3 stays all zero
t[0] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
t[1] = torch.tensor([1.0001, 0.3, -0.7, 0.25, 0.125, -0.0625, 0.999, -1.0])
t[2] = torch.tensor([65504.0, 257.0, -1024.5, 3.0, -7.0, 0.0, 1.0, 2.0])
int8_case("int8_ties", "F32", [4, 8], w=t)

# the dynamic-map blockwise quantizer on its own: a sweep of [-1, 1] and the near-zero codes
sweep = torch.linspace(-1, 1, 3001)
near0 = torch.linspace(-3e-4, 3e-4, 255)
blockwise8_case("blockwise8_sweep", torch.cat([sweep, near0, torch.tensor([1.0, 0.0])]), 256)
blockwise8_case("blockwise8_random", torch.randn(1000) * torch.rand(1000), 256)

os.makedirs(OUT, exist_ok=True)
save_file(tensors, os.path.join(OUT, "fixtures.safetensors"))
meta = dict(bitsandbytes=bnb.__version__, torch=torch.__version__, cases=cases)
with open(os.path.join(OUT, "cases.json"), "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")
print(f"{len(cases)} cases, {len(tensors)} tensors, bitsandbytes {bnb.__version__}, torch {torch.__version__}")
