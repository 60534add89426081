#!/usr/bin/env python3
"""Writes the binary files of the malformed-input corpus (safetensors and GGUF bytes).

The text files of the corpus (config.json, indexes, tokenizers, registries, texts) are written by
hand; only files with length prefixes and little-endian numbers come from here, each built byte
by byte so the defect is exactly the one the case names. The files are committed: the test
(host/tests/malformed.rs) reads them and never runs this script. Python 3 standard library only:

    python3 tests/malformed/make-binary-cases.py

Re-running rewrites the same bytes. To add a binary case, add a line below, run the script, and add
the case's row to expected.toml.
"""

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write(case, name, data):
    path = HERE / case / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def safetensors(header, data=b"", header_len=None):
    """A safetensors file: 8-byte little-endian header length, the header text, the data.

    `header` is a string (written verbatim, so it may be broken JSON) or bytes; `header_len`
    overrides the stated length."""
    raw = header.encode() if isinstance(header, str) else header
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def st_json(entries, data):
    return safetensors(json.dumps(entries, separators=(",", ":")), data)


# The valid two-tensor file the header cases depart from: `a` F32 [2] then `b` U8 [4].
TWO = {"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 8, 12)}
TWO_DATA = struct.pack("<2f", 1.5, -2.0) + bytes([1, 2, 3, 4])


def safetensors_cases():
    write("st-empty-file", "model.safetensors", b"")
    write("st-too-short", "model.safetensors", b"\x10\x00\x00")
    write("st-header-past-eof", "model.safetensors", safetensors("{}", b"\0" * 6, header_len=4096))
    write("st-header-not-utf8", "model.safetensors", safetensors(b'{"\xff\xfe":1}'))
    write("st-header-not-json", "model.safetensors", safetensors('{"a":{"dtype":"F32","shape":[2],', b"\0" * 8))
    write("st-header-not-object", "model.safetensors", safetensors("[1,2,3]"))
    write("st-entry-not-object", "model.safetensors", st_json({"a": 5}, b""))
    write("st-entry-missing-field", "model.safetensors",
          st_json({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8))
    # Written by hand: json.dumps cannot repeat a key.
    write("st-duplicate-tensor", "model.safetensors", safetensors(
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
        '"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}', b"\0" * 4))
    write("st-overlapping-offsets", "model.safetensors",
          st_json({"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 4, 8)}, b"\0" * 8))
    write("st-gap-between-tensors", "model.safetensors",
          st_json({"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 10, 14)}, b"\0" * 14))
    write("st-trailing-bytes", "model.safetensors", st_json(TWO, TWO_DATA + b"\0" * 4))
    write("st-offsets-past-end", "model.safetensors",
          st_json({"a": entry("F32", [16], 0, 64)}, b"\0" * 16))
    # A valid file cut in the middle of its last tensor, as an interrupted download leaves it.
    write("st-truncated", "model.safetensors", st_json(TWO, TWO_DATA)[:-3])
    write("st-offsets-reversed", "model.safetensors", st_json({"a": entry("U8", [4], 4, 0)}, b"\0" * 4))
    write("st-offsets-wrong-size", "model.safetensors", st_json({"a": entry("F32", [2, 2], 0, 8)}, b"\0" * 8))
    write("st-unknown-dtype", "model.safetensors", st_json({"a": entry("INT3", [8], 0, 3)}, b"\0" * 3))
    write("st-shape-overflow", "model.safetensors",
          st_json({"a": entry("F32", [2**32, 2**32, 2**32], 0, 0)}, b""))
    write("st-shape-negative", "model.safetensors", st_json({"a": entry("F32", [-1, 2], 0, 8)}, b"\0" * 8))
    write("st-metadata-not-strings", "model.safetensors",
          st_json({"__metadata__": {"format": "pt", "step": 1200}, **TWO}, TWO_DATA))


def model_folder_cases():
    """Shards for the folder and index cases (their config.json and indexes are hand-written)."""
    for case in ["config-not-json", "config-not-object", "options-not-toml"]:
        write(case, "model.safetensors", st_json(TWO, TWO_DATA))
    # Two shards that both hold `a`.
    write("shard-tensor-twice", "model-00001-of-00002.safetensors", st_json(TWO, TWO_DATA))
    write("shard-tensor-twice", "model-00002-of-00002.safetensors",
          st_json({"a": entry("F32", [2], 0, 8)}, TWO_DATA[:8]))
    write("index-tensor-not-in-shard", "model-00001-of-00001.safetensors", st_json(TWO, TWO_DATA))
    write("index-missing-shard", "model-00001-of-00002.safetensors", st_json(TWO, TWO_DATA))
    # The eval cases only get as far as config.json: an empty, valid weights file is enough.
    for case in ["eval-config-missing-key", "eval-config-wrong-type", "eval-config-wrong-float",
                 "eval-config-out-of-range"]:
        write(case, "model.safetensors", st_json({}, b""))


def tiny_llama():
    """A valid one-layer Llama (hidden 8, 2 heads of 4, MLP 16, vocabulary 4, tied head), F32.

    Values are a fixed pattern, not trained: the cases only need a model that loads and runs."""
    shapes = [
        ("model.embed_tokens.weight", [4, 8]),
        ("model.layers.0.input_layernorm.weight", [8]),
        ("model.layers.0.self_attn.q_proj.weight", [8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", [8, 8]),
        ("model.layers.0.self_attn.v_proj.weight", [8, 8]),
        ("model.layers.0.self_attn.o_proj.weight", [8, 8]),
        ("model.layers.0.post_attention_layernorm.weight", [8]),
        ("model.layers.0.mlp.gate_proj.weight", [16, 8]),
        ("model.layers.0.mlp.up_proj.weight", [16, 8]),
        ("model.layers.0.mlp.down_proj.weight", [8, 16]),
        ("model.norm.weight", [8]),
    ]
    header, data = {}, b""
    for name, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        if len(shape) == 1:
            values = [1.0] * n
        else:
            values = [((i * 7) % 13 - 6) / 16 for i in range(n)]
        header[name] = entry("F32", shape, len(data), len(data) + 4 * n)
        data += struct.pack(f"<{n}f", *values)
    return st_json(header, data)


def gguf(tensor_type=0, dims=(4,), data=None):
    """A GGUF v3 file with `general.architecture = llama` and one tensor `output_norm.weight`."""
    def string(s):
        return struct.pack("<Q", len(s)) + s.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    out += string("general.architecture") + struct.pack("<I", 8) + string("llama")
    out += string("output_norm.weight") + struct.pack("<I", len(dims))
    out += b"".join(struct.pack("<Q", d) for d in dims)
    out += struct.pack("<IQ", tensor_type, 0)
    out += b"\0" * (-len(out) % 32)
    return out + (data if data is not None else struct.pack("<4f", 1, 1, 1, 1))


def gguf_cases():
    write("gguf-empty-file", "model.gguf", b"")
    write("gguf-bad-magic", "model.gguf", b"GGML" + gguf()[4:])
    # Cut inside the metadata value `llama`.
    write("gguf-truncated", "model.gguf", gguf()[:66])
    write("gguf-tensor-past-end", "model.gguf", gguf()[:-4])
    write("gguf-unknown-tensor-type", "model.gguf", gguf(tensor_type=99))


def main():
    safetensors_cases()
    model_folder_cases()
    for case in ["tiny-llama", "eval-tokenizer-not-json", "calibration-tokenizer-not-json"]:
        write(case, "model.safetensors", tiny_llama())
    gguf_cases()


if __name__ == "__main__":
    main()
