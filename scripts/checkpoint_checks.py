"""Shared steps of the scripts that check a packed checkpoint kvant wrote against other readers
of its format (plugins/gptq/scripts/check-gptqmodel.py, plugins/awq/scripts/check-gptqmodel.py).

A script unpacks every module in numpy (its own format's code) and hands the dense weights to
`check_against_kvant`, which runs the two comparisons both formats share:
1. the numpy unpacking must give the weights `kvant dequantize` gives;
2. those weights run in transformers (F32, CPU); their perplexity on the windows `kvant eval`
   scores must match kvant's own evaluation of the checkpoint.
"""

import json
import math
import os
import subprocess
import tempfile

import numpy as np
from safetensors.numpy import load_file


def load_folder(path):
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def dense_state(out_dir, dequantize):
    """The checkpoint's tensors with every packed module (one with a `.qweight`) replaced by its
    dense `.weight` from `dequantize(tensors, module)`; returns (state, modules)."""
    tensors = load_folder(out_dir)
    state = {}
    modules = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    for m in modules:
        state[m + ".weight"] = dequantize(tensors, m)
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


def check_against_kvant(args, kvant, state, modules, unpacking):
    """Steps 1 and 2 of the module doc for the checkpoint `args.out` (`args.text`, `args.windows`,
    `args.ctx` choose the windows); `kvant` is the command line that runs kvant and `unpacking`
    names the numpy unpacking in the report. Returns (failures, ids, transformers' logits,
    kvant's perplexity)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = os.path.join(tmp, "dense")
        subprocess.run(kvant + ["dequantize", args.out, "-o", dense_dir, "--dtype", "f32", "-q"], check=True)
        kvant_dense = load_folder(dense_dir)
    worst = max(float(np.abs(state[m + ".weight"] - kvant_dense[m + ".weight"]).max()) for m in modules)
    print(f"[1] {len(modules)} modules: numpy {unpacking} unpacking vs kvant dequantize, max |diff| {worst:.3g}")
    if worst > 1e-6:
        failures.append(f"unpacking differs from kvant's dequantize by {worst}")

    ids = windows(args.out, args.text, args.windows, args.ctx)
    config = json.load(open(os.path.join(args.out, "config.json")))
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
    print(f"[2] PPL: transformers on {unpacking}-unpacked weights {ref_ppl:.4f}, kvant eval {kvant_ppl:.4f}")
    if abs(ref_ppl - kvant_ppl) > 1e-3 * ref_ppl:
        failures.append(f"perplexities differ: {ref_ppl} vs {kvant_ppl}")
    return failures, ids, ref_logits, kvant_ppl
