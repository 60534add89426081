"""Times transformers (PyTorch, F32, CPU) on the evaluation kvant's `eval` benchmark runs: the first
8 windows of 512 tokens of the 21st-century speeches, no BOS, perplexity over the windows.

    python scripts/bench-eval-pytorch.py [HF_MODEL_DIR] [TEXT]

Needs torch and transformers (e.g. a throwaway virtual environment); CI does not run it.
"""
import math
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = sys.argv[1] if len(sys.argv) > 1 else ".cache/kvant/smollm2-f32"
text_path = sys.argv[2] if len(sys.argv) > 2 else ".cache/kvant/sotu-2000s.txt"
ctx, windows = 512, 8

tok = AutoTokenizer.from_pretrained(model_dir)
ids = tok(open(text_path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
batch = torch.tensor(ids[: ctx * windows]).view(windows, ctx)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
torch.set_num_threads(torch.get_num_threads())

with torch.inference_mode():
    start = time.perf_counter()
    logits = model(batch).logits
    seconds = time.perf_counter() - start
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
print(f"transformers {windows} x {ctx}: PPL {math.exp(nll.item()):.4f}, forward {seconds:.2f} s, threads {torch.get_num_threads()}")
