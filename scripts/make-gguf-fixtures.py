#!/usr/bin/env python3
"""Writes the block-dequantization fixtures of the kvant-gguf plugin.

For every ggml type kvant dequantizes, `plugins/gguf/tests/fixtures/<type>.bin` holds raw blocks and
`<type>.f32` the little-endian float32 values the `gguf` Python package (llama.cpp's gguf-py)
dequantizes them to. The blocks are, where gguf-py can quantize the type, Gaussian data with outliers
quantized by it, followed by blocks of random bytes whose f16 scale fields are replaced by finite
values (random bytes would otherwise hit NaN/inf scales). Deterministic: rerunning gives the same files.

Needs numpy and gguf (`/work/pyref/bin/python scripts/make-gguf-fixtures.py`).
"""

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parent.parent / "plugins" / "gguf" / "tests" / "fixtures"

# Byte offsets of the f16 scale fields inside one block (ggml-common.h block structs).
F16_FIELDS = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}


def finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scales as they occur (around 1e-3), with zeros, negatives and a few subnormals mixed in."""
    v = (rng.standard_normal(n) * 0.02).astype(np.float16)
    v[rng.random(n) < 0.1] = np.float16(0)
    sub = rng.random(n) < 0.1
    v[sub] = (rng.integers(1, 1024, sub.sum()).astype(np.uint16)).view(np.float16)
    return v


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def float_values(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n).astype(np.float32) * 3
    v[:8] = [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-45, 65504.0, 3.4e38]
    return v


def write(name: str, raw: np.ndarray, expected: np.ndarray) -> None:
    (OUT / f"{name}.bin").write_bytes(raw.astype(np.uint8, copy=False).tobytes())
    (OUT / f"{name}.f32").write_bytes(expected.astype("<f4", copy=False).tobytes())
    print(f"{name}: {raw.size} bytes -> {expected.size} values")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261122)

    v = float_values(rng, 256)
    write("f32", v.view(np.uint8), dequantize(v.view(np.uint8), T.F32))
    with np.errstate(over="ignore"):  # 3.4e38 becomes inf on purpose
        f16 = float_values(rng, 256).astype(np.float16)
    f16[8:16] = np.array([1, 2, 0x3FF, 0x8001, 0x7BFF, 0xFBFF, 0x0400, 0x8400], dtype=np.uint16).view(np.float16)
    write("f16", f16.view(np.uint8), dequantize(f16.view(np.uint8), T.F16))
    bf16 = quantize(float_values(rng, 256), T.BF16)
    write("bf16", bf16, dequantize(bf16, T.BF16))

    for qtype in F16_FIELDS:
        block_size, _ = GGML_QUANT_SIZES[qtype]
        parts = []
        if qtype in QUANTIZABLE:
            x = rng.standard_normal((4, block_size)).astype(np.float32) * 0.05
            x[rng.random(x.shape) < 0.02] *= 20
            x[1] = 0  # an all-zero block has scale 0
            parts.append(quantize(x, qtype).reshape(4, -1))
        n_random = 8 if block_size == 32 else 3
        parts.append(random_blocks(rng, qtype, n_random))
        raw = np.concatenate(parts, axis=0)
        write(qtype.name.lower(), raw, dequantize(raw, qtype).reshape(-1))


if __name__ == "__main__":
    main()
