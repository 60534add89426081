#!/usr/bin/env bash
# Runs kvant's whole test suite: fetches the real test material (SmolLM2-135M and the State of
# the Union texts) into the cache on first use, builds the plugins, then runs every test.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/fetch-test-material.sh
# The registry's plugins are release cdylibs; tests and the CLI load them from there.
cargo build --release --workspace
# The real-model tests read SmolLM2 as a Hugging Face folder; kvant imports it from the GGUF.
cache="${KVANT_CACHE:-$repo/.cache/kvant}"
if [[ ! -f "$cache/smollm2-f32/config.json" ]]; then
    target/release/kvant dequantize "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$cache/smollm2-f32" --dtype f32 -q
fi
cargo test --release --workspace
