#!/usr/bin/env bash
# kvant's main job: the real SmolLM2-135M, imported from its GGUF, quantized end to end with
# each method named below, and the quality report of each against the F32 model
# (perplexity, KL divergence, top-1 agreement on 8 x 512 tokens of the 21st-century
# State of the Union speeches, text the model was not calibrated on).
#
#   scripts/main-job.sh [METHOD[:key=value,...]]...
#
# Default: rtn 4-bit g128 and, when their plugins are built, bnb-nf4 and hqq 4-bit g64.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cache="${KVANT_CACHE:-$repo/.cache/kvant}"

bash scripts/fetch-test-material.sh "$cache"
cargo build --release --workspace
kvant="$repo/target/release/kvant"

model="$cache/smollm2-f32"
if [[ ! -f "$model/config.json" ]]; then
    "$kvant" dequantize "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$model" --dtype f32
fi

available="$("$kvant" list --json -q)"
has() { grep -q "\"name\": \"$1\"" <<<"$available"; }

jobs=("$@")
if [[ ${#jobs[@]} -eq 0 ]]; then
    jobs=("rtn:bits=4,group_size=128")
    has bnb-nf4 && jobs+=("bnb-nf4")
    has hqq && jobs+=("hqq:nbits=4,group_size=64")
fi

for job in "${jobs[@]}"; do
    method="${job%%:*}"
    sets=()
    if [[ "$job" == *:* ]]; then
        IFS=',' read -ra kvs <<<"${job#*:}"
        for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
    fi
    out="$cache/smollm2-${job//[:=,]/-}"
    echo
    echo "=== $method ${sets[*]:-} ==="
    "$kvant" quantize "$model" --method "$method" "${sets[@]}" -o "$out" --force \
        --eval "$cache/sotu-2000s.txt" --windows 8 --ctx 512
done
