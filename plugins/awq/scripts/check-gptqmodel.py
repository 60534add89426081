#!/usr/bin/env python3
"""Checks kvant's AWQ GEMM output against other readers of the format.

    check-gptqmodel.py OUT --text sotu-2000s.txt [--windows 8] [--ctx 512] [--kvant target/release/kvant]

1. AutoAWQ's unpacking, rewritten here in numpy (int32 words -> nibbles -> AutoAWQ's reverse
   interleave -> (q - zero) * scale), must give the weights `kvant dequantize` gives.
2. Those weights, with the checkpoint's folded norms, run in transformers (F32, CPU); their
   perplexity on the same windows `kvant eval` scores must match kvant's packed forward.
3. When GPTQModel is importable, the checkpoint is loaded with `backend=BACKEND.AWQ_TORCH` on
   CPU and its logits are compared with step 2's (GPTQModel refuses groups that do not divide
   in_features, e.g. 576 at group 128; the numpy path does not need that).

Exits non-zero when a comparison fails. Run it with the shared venv: /work/pyref/bin/python.
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

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def load_folder(path):
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def unpack_awq(words):
    """int32 [r, c] -> int [r, 8c], nibble i of each word at column 8w + i (AutoAWQ's unpack_awq)."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    nib = (words.astype(np.uint32)[:, :, None] >> shifts[None, None, :]) & 0xF
    return nib.reshape(words.shape[0], -1).astype(np.int32)


def reverse_awq_order(unpacked):
    """Undo the GEMM interleave: true column 8w + j is unpacked column 8w + AWQ_REVERSE_ORDER[j]."""
    cols = unpacked.shape[1]
    order = np.arange(cols).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
    return unpacked[:, order]


def dequantize_gemm(qweight, qzeros, scales, group_size):
    """Dense [out, in] float32 weight of one AWQ GEMM module."""
    iweight = reverse_awq_order(unpack_awq(qweight))  # [in, out]
    izeros = reverse_awq_order(unpack_awq(qzeros))  # [groups, out]
    inp = iweight.shape[0]
    # AutoAWQ repeats each group row group_size times; the index form also covers a short last group.
    g = np.arange(inp) // (group_size if group_size > 0 else inp)
    w = (iweight - izeros[g]).astype(np.float32) * scales.astype(np.float32)[g]
    return w.T.copy()


def dense_state(out_dir, group_size):
    tensors = load_folder(out_dir)
    state = {}
    modules = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    for m in modules:
        state[m + ".weight"] = dequantize_gemm(tensors[m + ".qweight"], tensors[m + ".qzeros"], tensors[m + ".scales"], group_size)
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
    ap.add_argument("out", help="kvant's AWQ output folder")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--kvant", default=os.path.join(os.path.dirname(__file__), "../../../target/release/kvant"))
    ap.add_argument("--skip-gptqmodel", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    config = json.load(open(os.path.join(args.out, "config.json")))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["bits"] == 4, qc
    failures = []

    # 1. numpy AutoAWQ unpacking vs kvant dequantize.
    state, modules = dense_state(args.out, qc["group_size"])
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = os.path.join(tmp, "dense")
        subprocess.run([args.kvant, "dequantize", args.out, "-o", dense_dir, "--dtype", "f32", "-q"], check=True)
        kvant_dense = load_folder(dense_dir)
    worst = max(float(np.abs(state[m + ".weight"] - kvant_dense[m + ".weight"]).max()) for m in modules)
    print(f"[1] {len(modules)} modules: numpy AutoAWQ unpacking vs kvant dequantize, max |diff| {worst:.3g}")
    if worst > 1e-6:
        failures.append(f"unpacking differs from kvant's dequantize by {worst}")

    # 2. transformers on the unpacked weights vs kvant's packed forward (perplexity, same windows).
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
        [args.kvant, "eval", args.out, "--text", args.text, "--windows", str(args.windows), "--ctx", str(args.ctx), "--json", "-q"],
        check=True,
        capture_output=True,
        text=True,
    )
    kvant_ppl = json.loads(run.stdout)["ppl"]
    print(f"[2] PPL: transformers on AutoAWQ-unpacked weights {ref_ppl:.4f}, kvant packed forward {kvant_ppl:.4f}")
    if abs(ref_ppl - kvant_ppl) > 1e-3 * ref_ppl:
        failures.append(f"perplexities differ: {ref_ppl} vs {kvant_ppl}")

    # 3. GPTQModel's AWQ torch kernel.
    if not args.skip_gptqmodel:
        try:
            from gptqmodel import BACKEND, GPTQModel
        except ImportError as e:
            print(f"[3] GPTQModel is not importable here ({e}); steps 1-2 checked the format instead")
        else:
            gm = GPTQModel.load(args.out, backend=BACKEND.AWQ_TORCH, device="cpu", torch_dtype=torch.float32)
            g_logits = logits_of(gm.model if hasattr(gm, "model") else gm, ids)
            diff = (g_logits - ref_logits).abs().max().item()
            print(f"[3] GPTQModel AWQ_TORCH: PPL {ppl(g_logits, ids):.4f}, max |logit diff| vs step 2 {diff:.3g}")
            if diff > 1e-2 * ref_logits.abs().max().item():
                failures.append(f"GPTQModel logits differ by {diff}")

    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
