#!/usr/bin/env python3
"""kvant against GPTQModel on the same calibration job (`--method gptq`, or `awq`), in one run:
wall time and peak memory of each (end to end: process start to checkpoint written), their
ratios, and each output's perplexity as `kvant eval` scores it (kvant reads GPTQModel's
checkpoints too).

    bench-gptqmodel.py MODEL --calibration TEXT --eval TEXT [--method gptq|awq] [--samples 128]
        [--seq-len 512] [--bits 4] [--group-size 128] [--asym] [--kvant target/release/kvant]
        [--work DIR] [--skip-gptqmodel] [--gptqmodel-timeout S] [-- extra kvant quantize arguments]

`--gptqmodel-timeout` stops GPTQModel after S seconds (its AWQ takes over half an hour on two
cores) and reports its peak memory up to then, a lower bound of its whole run's.

Both tools get the same calibration windows: the text is tokenized with MODEL's tokenizer.json
and the windows are chosen with kvant's seeded shuffle (re-implemented below), then handed to
GPTQModel as token ids. GPTQModel runs with `QuantizeConfig(bits, group_size, sym,
desc_act=False, damp_percent=0.05)` on CPU in F32 (AWQ: GEMM format, zero point, in BF16, as
its AWQ kernels refuse F32) with GPTQMODEL_CPU_WORKERS set to the core
count, as the issue measured it (266 s for 4-bit g128 on the 2-core box).

Needs torch, transformers, tokenizers and gptqmodel (the shared venv /work/pyref/bin/python has
them; elsewhere `python -m venv V && V/bin/pip install torch transformers tokenizers gptqmodel`).
"""

import argparse
import json
import os
import subprocess
import sys
import time


def kvant_windows(tokenizer_json, text, samples, seq_len, seed):
    """The token windows `kvant quantize --calibration` picks (host/src/calibration.rs)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(tokenizer_json).encode(open(text, encoding="utf-8").read(), add_special_tokens=False).ids
    available = len(ids) // seq_len
    if available < samples:
        sys.exit(f"{text} gives {available} windows of {seq_len} tokens, {samples} needed")
    mask = (1 << 64) - 1
    order = list(range(available))
    state = seed ^ 0x9E3779B97F4A7C15
    for i in range(available - 1, 0, -1):
        state = (state * 6364136223846793005 + 1442695040888963407) & mask
        j = (state >> 33) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return [ids[w * seq_len : (w + 1) * seq_len] for w in sorted(order[:samples])]


def run_child(argv, env=None, timeout=None):
    """Runs argv, killed after `timeout` seconds if given; returns (exit status or None when
    killed, wall seconds, peak RSS in MiB) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if timeout else 0)
        if pid:
            return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024
        if time.perf_counter() - start > timeout:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            return None, time.perf_counter() - start, usage.ru_maxrss / 1024
        time.sleep(0.5)


def gptqmodel_worker(args):
    """Child process: GPTQModel quantizes MODEL on the windows in args.windows_file."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = json.load(open(args.windows_file))
    dataset = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    if args.method == "awq":
        config = QuantizeConfig(quant_method="awq", format="gemm", bits=args.bits, group_size=args.group_size, zero_point=True)
    else:
        config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=False, damp_percent=0.05)
    # GPTQModel's AWQ kernels refuse float32 (only float16/bfloat16); its GPTQ runs in F32.
    dtype = torch.bfloat16 if args.method == "awq" else torch.float32
    model = GPTQModel.load(args.model, config, dtype=dtype, device="cpu")
    model.quantize(dataset, batch_size=1)
    model.save(args.out)


def kvant_ppl(kvant, out, text):
    r = subprocess.run([kvant, "eval", out, "--text", text, "--windows", "8", "--json", "-q"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"eval failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return json.loads(r.stdout)["ppl"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    ap.add_argument("--gptqmodel-timeout", type=float)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--kvant", default=os.path.join(os.path.dirname(__file__), "../../../target/release/kvant"))
    ap.add_argument("--work", default="/tmp/kvant-bench-gptq")
    ap.add_argument("--skip-gptqmodel", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--windows-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    if args.worker:
        return gptqmodel_worker(args)
    extra = [a for a in extra if a != "--"]

    os.makedirs(args.work, exist_ok=True)
    kv_out, gm_out = os.path.join(args.work, "kvant"), os.path.join(args.work, "gptqmodel")
    cores = os.cpu_count()
    print(f"job: {args.method} on {args.model}, {args.bits}-bit g{args.group_size} {'asym' if args.asym else 'sym'}, "
          f"{args.samples} x {args.seq_len} calibration tokens, {cores} cores, load {os.getloadavg()[0]:.1f}")

    rows = []
    kv_cmd = [args.kvant, "quantize", args.model, "--method", args.method, "-o", kv_out, "--force", "-q",
              "--calibration", args.calibration, "--calibration-samples", str(args.samples),
              "--calibration-seq-len", str(args.seq_len), "--seed", str(args.seed),
              "--set", f"bits={args.bits}", "--set", f"group_size={args.group_size}"]
    if args.method == "gptq":
        kv_cmd += ["--set", f"sym={'false' if args.asym else 'true'}", "--set", "desc_act=false", "--set", "damp_percent=0.05"]
    kv_cmd += extra
    code, wall, rss = run_child(kv_cmd)
    if code != 0:
        sys.exit(f"kvant failed ({code}): {' '.join(kv_cmd)}")
    rows.append((f"kvant {args.method}", wall, rss, kvant_ppl(args.kvant, kv_out, args.eval)))

    if not args.skip_gptqmodel:
        windows_file = os.path.join(args.work, "windows.json")
        json.dump(kvant_windows(os.path.join(args.model, "tokenizer.json"), args.calibration, args.samples, args.seq_len, args.seed),
                  open(windows_file, "w"))
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS=str(cores), CUDA_VISIBLE_DEVICES="")
        gm_cmd = [sys.executable, __file__, args.model, "--calibration", args.calibration, "--eval", args.eval,
                  "--method", args.method, "--bits", str(args.bits), "--group-size", str(args.group_size), "--worker",
                  "--windows-file", windows_file, "--out", gm_out] + (["--asym"] if args.asym else [])
        code, wall, rss = run_child(gm_cmd, env, args.gptqmodel_timeout)
        if code is None:
            rows.append(("GPTQModel", wall, rss, f"stopped after {wall:.0f} s"))
        elif code != 0:
            sys.exit(f"GPTQModel failed ({code})")
        else:
            rows.append(("GPTQModel", wall, rss, kvant_ppl(args.kvant, gm_out, args.eval)))

    print(f"{'':12} {'wall s':>8} {'peak RSS MiB':>13} {'PPL (kvant eval, 8 x 512)':>27}")
    for name, wall, rss, ppl in rows:
        ppl = f"{ppl:.4f}" if isinstance(ppl, float) else ppl
        print(f"{name:12} {wall:8.1f} {rss:13.0f} {ppl:>27}")
    if len(rows) == 2:
        at_least = "at least " if str(rows[1][3]).startswith("stopped") else ""
        print(f"GPTQModel / kvant: time {at_least}{rows[1][1] / rows[0][1]:.2f}x, peak memory {at_least}{rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
