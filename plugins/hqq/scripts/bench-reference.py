#!/usr/bin/env python3
"""Times the hqq 0.2.8 library quantizing every Linear of a model (4-bit g64 axis 1, hqq defaults,
F32 on CPU); prints `seconds <wall> cpu <cpu seconds> layers <n>`. Run by `cargo bench -p kvant-hqq`.

    python bench-reference.py MODEL.safetensors
"""
import sys, time

import torch
from safetensors.torch import load_file
from hqq.core.quantize import Quantizer

sd = load_file(sys.argv[1])
layers = [v.float() for k, v in sd.items() if k.endswith("_proj.weight")]
start, cpu = time.perf_counter(), time.process_time()
for w in layers:
    Quantizer.quantize(w, nbits=4, group_size=64, axis=1, optimize=True, round_zero=True, device="cpu",
                       compute_dtype=torch.float32)
print(f"seconds {time.perf_counter() - start:.3f} cpu {time.process_time() - cpu:.3f} layers {len(layers)}")
