#!/usr/bin/env python3
"""Whole-model NF4 quantization, kvant against transformers + bitsandbytes, in the same run.

    python plugins/bnb/scripts/bench-whole-model.py [--rounds 3] [--double-quant] [MODEL ...]

MODEL defaults to .cache/kvant/smollm2-f32 and .cache/kvant/smollm2-bf16 (SmolLM2-135M, see
scripts/fetch-test-material.sh). For each model, round after round, alternating so that both
sides see the same machine load:

- kvant: `target/release/kvant quantize MODEL --method bnb-nf4 -o OUT` (a new OUT each time),
  the whole process under `/usr/bin/time -v`: wall time and peak resident memory;
- transformers: `AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), device_map="cpu", dtype=the
  checkpoint's)` in a fresh Python process, timed around that call only (imports excluded), and
  that process's peak resident memory (torch included).

The settings are the same on both sides (NF4, blocksize 64, double quant only with
--double-quant). Prints each run, the medians and the ratios, and `uptime`'s load average.
Needs Python with torch, transformers and bitsandbytes (e.g. `python -m venv /work/pyref &&
/work/pyref/bin/pip install torch transformers bitsandbytes`; run with that Python), the release
binaries (`cargo build --release -p kvant -p kvant-bnb`) and /usr/bin/time.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

TRANSFORMERS = r"""
import json, os, resource, sys, time
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

model, double_quant = sys.argv[1], sys.argv[2] == "1"
name = next(n for n in sorted(os.listdir(model)) if n.endswith(".safetensors"))
with safe_open(os.path.join(model, name), "pt") as f:
    dtype = f.get_slice(next(k for k in f.keys() if k.endswith("proj.weight"))).get_dtype()
dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant)
started = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(model, quantization_config=config, device_map="cpu", dtype=dtype)
seconds = time.perf_counter() - started
linear4 = sum(1 for x in m.modules() if type(x).__name__ == "Linear4bit")
print(json.dumps({"seconds": seconds, "linear4bit": linear4,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed(cmd):
    """Runs cmd under /usr/bin/time -v: (wall seconds, peak MiB, stdout)."""
    out = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    fields = {}
    for line in out.stderr.splitlines():
        key, _, value = line.strip().rpartition(": ")
        fields[key] = value
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall)))
    return seconds, int(fields["Maximum resident set size (kbytes)"]) / 1024, out.stdout


def kvant(model, double_quant, scratch):
    out = os.path.join(scratch, "out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(ROOT, "target/release/kvant"), "quantize", model, "--method", "bnb-nf4", "-q", "-o", out]
    if double_quant:
        cmd += ["--set", "bnb_4bit_use_double_quant=true"]
    seconds, peak, _ = timed(cmd)
    return seconds, peak


def transformers(model, double_quant):
    _, peak, stdout = timed([sys.executable, "-c", TRANSFORMERS, model, "1" if double_quant else "0"])
    result = json.loads(stdout.strip().splitlines()[-1])
    if result["linear4bit"] != 210:
        sys.exit(f"transformers quantized {result['linear4bit']} Linears of {model}, expected 210")
    return result["seconds"], peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*",
                    default=[os.path.join(ROOT, ".cache/kvant", m) for m in ("smollm2-f32", "smollm2-bf16")])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--double-quant", action="store_true")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} CPUs, double quant {a.double_quant}")
    with tempfile.TemporaryDirectory() as scratch:
        for model in a.models:
            # warm-up: the page cache and the plugin libraries
            kvant(model, a.double_quant, scratch)
            runs = {"kvant": [], "transformers": []}
            for r in range(a.rounds):
                for side in ("kvant", "transformers"):
                    s, peak = kvant(model, a.double_quant, scratch) if side == "kvant" else transformers(model, a.double_quant)
                    runs[side].append((s, peak))
                    print(f"  {os.path.basename(model)} round {r + 1} {side:<12} {s:6.2f} s  peak {peak:6.0f} MiB", flush=True)
            k = statistics.median(s for s, _ in runs["kvant"])
            t = statistics.median(s for s, _ in runs["transformers"])
            kp = max(p for _, p in runs["kvant"])
            tp = max(p for _, p in runs["transformers"])
            print(f"{os.path.basename(model)}: kvant {k:.2f} s (whole process), transformers + bitsandbytes {t:.2f} s "
                  f"(from_pretrained only): {t / k:.1f}x faster; peak RSS {kp:.0f} MiB vs {tp:.0f} MiB "
                  f"({tp / kp:.1f}x less)")
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
