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
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../scripts"))
from checkpoint_checks import check_against_kvant, dense_state, logits_of, ppl  # noqa: E402

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


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

    torch.set_num_threads(os.cpu_count() or 1)
    config = json.load(open(os.path.join(args.out, "config.json")))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["bits"] == 4, qc

    # 1-2. numpy AutoAWQ unpacking vs kvant dequantize; transformers on it vs kvant's packed forward.
    def dequantize(t, m):
        return dequantize_gemm(t[m + ".qweight"], t[m + ".qzeros"], t[m + ".scales"], qc["group_size"])

    state, modules = dense_state(args.out, dequantize)
    failures, ids, ref_logits, _ = check_against_kvant(args, [args.kvant], state, modules, "AutoAWQ")

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
