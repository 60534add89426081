#!/usr/bin/env python3
"""bitsandbytes' side of `cargo bench -p kvant-bnb`: times the same operations on the CPU and prints
one JSON object (seconds, medians). Run by the Rust bench when a Python with bitsandbytes is found."""

import json
import statistics
import time

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F


def median_time(fn, runs):
    fn()  # warm-up: kernels, code tables, allocator
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


torch.manual_seed(0)
w = (torch.randn(4096, 4096) * 0.02).to(torch.bfloat16)
out = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "threads": torch.get_num_threads()}
out["nf4_quantize_s"] = median_time(
    lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"), 5)

packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
x = torch.randn(1, 4096, dtype=torch.bfloat16)
out["nf4_forward_bf16_s"] = median_time(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), 20)

wf = w.float()
xf = x.float()
out["dense_f32_forward_s"] = median_time(lambda: torch.nn.functional.linear(xf, wf), 20)

out["int8_quantize_s"] = median_time(lambda: F.int8_vectorwise_quant(w.half()), 5)
lin = bnb.nn.Linear8bitLt(4096, 4096, bias=False, has_fp16_weights=False, threshold=6.0)
lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
lin.eval()
xh = x.half()
with torch.no_grad():
    out["int8_forward_s"] = median_time(lambda: lin(xh), 10)
print(json.dumps(out))
