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
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file


def load_folder(path):
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


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


def dense_state(out_dir, bits, v1):
    tensors = load_folder(out_dir)
    state = {}
    modules = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    for m in modules:
        state[m + ".weight"] = dequantize_gptq(
            tensors[m + ".qweight"], tensors[m + ".qzeros"], tensors[m + ".scales"], tensors[m + ".g_idx"], bits, v1
        )
    for k, v in tensors.items():
        if k.rsplit(".", 1)[0] not in modules or k.endswith(".bias"):
            state[k] = v.astype(np.float32)
    return state, modules


def windows(out_dir, text, n, ctx):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    ids = tok.encode(open(text, encoding="utf-8").read(), add_special_tokens=False).ids
    assert len(ids) >= n * ctx, f"the text gives {len(ids)} tokens, fewer than {n} x {ctx}"
    return np.array(ids[: n * ctx], dtype=np.int64).reshape(n, ctx)


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(ids[i : i + 1])).logits.float() for i in range(ids.shape[0])])


def ppl(logits, ids):
    import torch

    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -lp.gather(-1, torch.from_numpy(ids[:, 1:]).unsqueeze(-1)).squeeze(-1)
    return math.exp(nll.mean().item())


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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    config = json.load(open(os.path.join(args.out, "config.json")))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] in ("gptq", "gptq_v2"), qc
    v1 = qc["checkpoint_format"] == "gptq"
    assert any(q.startswith("kvant-") for q in qc["meta"]["quantizer"]), qc["meta"]
    kvant = [args.kvant] + (["--registry", args.registry] if args.registry else [])
    failures = []

    # 1. numpy GPTQ unpacking vs kvant dequantize.
    state, modules = dense_state(args.out, qc["bits"], v1)
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = os.path.join(tmp, "dense")
        subprocess.run(kvant + ["dequantize", args.out, "-o", dense_dir, "--dtype", "f32", "-q"], check=True)
        kvant_dense = load_folder(dense_dir)
    worst = max(float(np.abs(state[m + ".weight"] - kvant_dense[m + ".weight"]).max()) for m in modules)
    print(f"[1] {len(modules)} modules: numpy {qc['checkpoint_format']} unpacking vs kvant dequantize, max |diff| {worst:.3g}")
    if worst > 1e-6:
        failures.append(f"unpacking differs from kvant's dequantize by {worst}")

    # 2. transformers on the unpacked weights vs kvant's evaluation (perplexity, same windows).
    ids = windows(args.out, args.text, args.windows, args.ctx)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg["torch_dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    ref_logits = logits_of(model, ids)
    ref_ppl = ppl(ref_logits, ids)
    run = subprocess.run(
        kvant + ["eval", args.out, "--text", args.text, "--windows", str(args.windows), "--ctx", str(args.ctx), "--json", "-q"],
        check=True,
        capture_output=True,
        text=True,
    )
    kvant_ppl = json.loads(run.stdout)["ppl"]
    print(f"[2] PPL: transformers on GPTQ-unpacked weights {ref_ppl:.4f}, kvant eval {kvant_ppl:.4f}")
    if abs(ref_ppl - kvant_ppl) > 1e-3 * ref_ppl:
        failures.append(f"perplexities differ: {ref_ppl} vs {kvant_ppl}")

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
