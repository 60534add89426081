#!/usr/bin/env bash
# The foundation issue's figures (see BENCHMARKS.md): builds the release binaries, writes a 1 GiB
# F32 checkpoint once into .cache/kvant/bench/, times `kvant quantize --method rtn` 4-bit group 128
# (wall time and peak RSS) and the host's per-call overhead against the in-process rtn library.
# KVANT_BENCH_ROUNDS=N sets the repetitions (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/time ]; then
    apt-get update -qq && apt-get install -y -qq time >/dev/null
fi
cargo build --release -p kvant -p kvant-rtn
cargo bench -p kvant --bench foundation
