#!/usr/bin/env bash
# Runs every cargo-fuzz target of kvant's parsers (safetensors file and index, config.json,
# registry.toml, GGUF) for SECONDS each (default 15: the CI smoke run; use minutes locally).
# Installs cargo-fuzz when missing. libFuzzer needs unstable rustc flags; RUSTC_BOOTSTRAP lets the
# stable toolchain pass them. Crashes are saved under fuzz/artifacts/<target>/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-15}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$repo/fuzz"
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none -O
for target in $(cargo fuzz list); do
    echo "== fuzz $target for ${seconds}s"
    cargo fuzz run -s none -O "$target" -- -max_total_time="$seconds" 2>&1 | grep -E "^Done|ERROR|panicked|deadly signal" || true
    if [[ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]]; then
        echo "error: fuzz target $target found crashing inputs in fuzz/artifacts/$target" >&2
        exit 1
    fi
done
