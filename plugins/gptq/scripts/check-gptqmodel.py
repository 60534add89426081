#!/usr/bin/env python3
"""Checks a GPTQ checkpoint kvant wrote against other readers of the format: the `gptq` method's
output, or the hqq method's GPTQ export (`--set export_format=gptq`).

    check-gptqmodel.py OUT --text sotu-2000s.txt [--windows 8] [--ctx 512] [--kvant target/release/kvant]

OUT comes from, e.g.:

    kvant quantize .cache/kvant/smollm2-f32 --method gptq --calibration .cache/kvant/sotu-pre2000.txt -o OUT
    kvant quantize .cache/kvant/smollm2-f32 --method hqq --set nbits=4 --set group_size=64 \\
        --set export_format=gptq -o OUT

1. GPTQ's unpacking, rewritten here in numpy (int32 words holding codes LSB-first down the
   input dimension, `qzeros` holding zero (gptq_v2) or zero - 1 (gptq, v1), groups from `g_idx`,
   `(q - zero) * scale`), must give the weights `kvant dequantize` gives.
2. Those weights run in transformers (F32, CPU); their perplexity on the windows `kvant eval`
   scores must match kvant's own evaluation of OUT.
3. GPTQModel loads OUT with `backend=BACKEND.TORCH` on CPU; its logits must match step 2's and
   its perplexity is printed beside kvant's (the kernel computes in F16, hence the tolerances).
   Skipped for asymmetric v1 checkpoints: GPTQModel 7.7 refuses those when another tool wrote
   them (its loader checks `meta.quantizer` for gptqmodel >= 0.9); symmetric v1 and gptq_v2 load.

Exits non-zero when a comparison fails. Needs numpy, safetensors, tokenizers, torch,
transformers and gptqmodel: the shared venv /work/pyref/bin/python has them; elsewhere
`python -m venv V && V/bin/pip install torch transformers safetensors tokenizers numpy gptqmodel`.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../scripts"))
from checkpoint_checks import check_against_kvant, dense_state, logits_of, ppl  # noqa: E402


def unpack_stream(words, bits, count, axis):
    """Values 0..count of the LSB-first bit streams running along `axis` of uint32 `words`."""
    w = np.moveaxis(words.astype(np.uint32), axis, -1).astype(np.uint64)
    out = np.empty(w.shape[:-1] + (count,), dtype=np.int64)
    mask = (1 << bits) - 1
    for k in range(count):
        bit = k * bits
        word, off = bit // 32, bit % 32
        v = w[..., word] >> np.uint64(off)
        if off + bits > 32:
            v |= w[..., word + 1] << np.uint64(32 - off)
        out[..., k] = (v & np.uint64(mask)).astype(np.int64)
    return np.moveaxis(out, -1, axis)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits, v1):
    """Dense [out, in] float32 weight of one GPTQ module."""
    inp = qweight.shape[0] * 32 // bits
    codes = unpack_stream(qweight, bits, inp, axis=0)  # [in, out]
    zeros = unpack_stream(qzeros, bits, scales.shape[1], axis=1) + int(v1)  # [groups, out]; v1 stores zero - 1
    g = g_idx.astype(np.int64)
    w = (codes - zeros[g]).astype(np.float32) * scales.astype(np.float32)[g]
    return w.T.copy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="a GPTQ checkpoint written by kvant")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--kvant", default=os.path.join(os.path.dirname(__file__), "../../../target/release/kvant"))
    ap.add_argument("--registry", help="passed to kvant as --registry")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    config = json.load(open(os.path.join(args.out, "config.json")))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] in ("gptq", "gptq_v2"), qc
    v1 = qc["checkpoint_format"] == "gptq"
    assert any(q.startswith("kvant-") for q in qc["meta"]["quantizer"]), qc["meta"]
    kvant = [args.kvant] + (["--registry", args.registry] if args.registry else [])

    # 1-2. numpy GPTQ unpacking vs kvant dequantize; transformers on it vs kvant eval.
    def dequantize(t, m):
        return dequantize_gptq(t[m + ".qweight"], t[m + ".qzeros"], t[m + ".scales"], t[m + ".g_idx"], qc["bits"], v1)

    state, modules = dense_state(args.out, dequantize)
    failures, ids, ref_logits, kvant_ppl = check_against_kvant(args, kvant, state, modules, qc["checkpoint_format"])

    # 3. GPTQModel's torch kernel (transformers loads GPTQ checkpoints through GPTQModel).
    if v1 and not qc["sym"]:
        print("[3] skipped: GPTQModel refuses asymmetric v1 checkpoints from other tools; write gptq_v2 to check it")
    else:
        from gptqmodel import BACKEND, GPTQModel

        # The torch kernel runs in half precision only (it refuses float32).
        gm = GPTQModel.load(args.out, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
        g_logits = logits_of(gm.model if hasattr(gm, "model") else gm, ids)
        diff = (g_logits - ref_logits).abs().max().item()
        g_ppl = ppl(g_logits, ids)
        print(f"[3] GPTQModel BACKEND.TORCH: PPL {g_ppl:.4f} (kvant {kvant_ppl:.4f}), max |logit diff| vs step 2 {diff:.3g}")
        if diff > 1e-2 * ref_logits.abs().max().item() or abs(g_ppl - kvant_ppl) > 5e-3 * kvant_ppl:
            failures.append(f"GPTQModel differs: logits by {diff}, PPL {g_ppl} vs {kvant_ppl}")

    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
