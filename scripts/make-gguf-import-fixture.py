#!/usr/bin/env python3
"""Writes host/tests/fixtures/smollm2-gguf-tensors.json: what importing the SmolLM2 GGUF must give.

For every tensor of the cached SmolLM2-135M-Instruct.Q4_1.gguf: its Hugging Face name, shape and
ggml type, and the sha256 of its float32 values in Hugging Face layout, as the `gguf` Python package
dequantizes them and numpy un-permutes the Q/K rows (llama.cpp's converter interleaved the rotary
halves of each head). A few leading values are kept for readable failures.

Run scripts/fetch-test-material.sh first; needs numpy and gguf:
    /work/pyref/bin/python scripts/make-gguf-import-fixture.py [CACHE_DIR]
"""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("KVANT_CACHE", REPO / ".cache" / "kvant"))
GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = REPO / "host" / "tests" / "fixtures" / "smollm2-gguf-tensors.json"

LAYER_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str:
    base, suffix = name.rsplit(".", 1)
    if base in TOP:
        return f"{TOP[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    return f"model.layers.{m[1]}.{LAYER_PARTS[m[2]]}.{suffix}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main() -> None:
    r = GGUFReader(GGUF)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    n_head, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    tensors = []
    for t in r.tensors:
        hf = hf_name(t.name)
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape.tolist())]
        w = w.reshape(shape)
        if ".q_proj." in hf:
            w = unpermute(w, n_head)
        elif ".k_proj." in hf:
            w = unpermute(w, n_kv)
        flat = np.ascontiguousarray(w, dtype="<f4").reshape(-1)
        tensors.append(
            {
                "gguf_name": t.name,
                "hf_name": hf,
                "type": t.tensor_type.name,
                "shape": shape,
                "sha256": hashlib.sha256(flat.tobytes()).hexdigest(),
                "first": [float(v) for v in flat[:4]],
            }
        )
    # One tensor per line keeps the file small and its diffs readable.
    lines = ",\n".join(json.dumps(t, separators=(",", ":")) for t in tensors)
    OUT.write_text(f'{{"file":{json.dumps(GGUF.name)},"tensors":[\n{lines}\n]}}\n')
    print(f"{OUT}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
