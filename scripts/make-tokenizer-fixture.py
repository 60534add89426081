#!/usr/bin/env python3
"""Writes host/tests/fixtures/smollm2-tokenizer-ids.json: texts and the ids llama.cpp gives them.

The reference is the GGUF's own tokenizer, llama.cpp (through llama-cpp-python, vocabulary only),
with special-token parsing on as Hugging Face tokenizers do it and no BOS (the file says
add_bos_token = false). The texts are excerpts of the State of the Union speeches cut at word
boundaries (several thousand words: curly quotes, dashes, numbers, newlines) and a few edge cases.
Transformers' own GGUF tokenizer conversion is run too, and where it disagrees with llama.cpp the
count is printed: it is informational, the fixture holds llama.cpp's ids.

Run scripts/fetch-test-material.sh first; needs llama-cpp-python (and transformers for the
comparison):
    /work/pyref/bin/python scripts/make-tokenizer-fixture.py [CACHE_DIR]
"""

import json
import os
import re
import sys
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("KVANT_CACHE", REPO / ".cache" / "kvant"))
GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = REPO / "host" / "tests" / "fixtures" / "smollm2-tokenizer-ids.json"

# (speech, first word, number of words)
EXCERPTS = [
    ("2021_joseph_r_biden_d.txt", 0, 1500),
    ("1790_george_washington_n.txt", 0, 700),
    ("1932_herbert_hoover_r.txt", 0, 900),
    ("2017_donald_j_trump_r.txt", 1000, 600),
    ("1840_martin_van_buren_d.txt", 2000, 400),
]

EDGE_CASES = [
    "In 1790, the debt was $75,463,476.52 — or 2.5% of GDP; by 2021 it was 100%.",
    "two spaces  12 and tabs\t\t7 and newlines\n\n\n1999\r\nend  ",
    "it's, it’s, we'll, WE'LL, they've, I'm, you'd, don't, Don’t",
    "Café naïve résumé — “quoted” ‘single’ • bullet ° degrees – en dash ‑ hyphen",
    "emoji 🇺🇸 and CJK 国会 and Greek αβγ and math x²+y³=z¹",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces, trailing spaces   ",
    "mixedCase123abc ABC123 a1b2c3 ١٢٣ Ⅻ",
]


def excerpt(name: str, start: int, count: int) -> str:
    text = (CACHE / "sotu" / name).read_text(encoding="utf-8")
    words = [m.span() for m in re.finditer(r"\S+", text)]
    return text[words[start][0] : words[start + count - 1][1]]


def main() -> None:
    vocab = llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)
    cases = [{"name": f"{n}[{s}:{s + c}]", "text": excerpt(n, s, c)} for n, s, c in EXCERPTS]
    cases += [{"name": f"edge {i}", "text": t} for i, t in enumerate(EDGE_CASES)]
    for case in cases:
        case["ids"] = vocab.tokenize(case["text"].encode("utf-8"), add_bos=False, special=True)

    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(CACHE), gguf_file=GGUF.name)
        for case in cases:
            ids = hf(case["text"], add_special_tokens=False)["input_ids"]
            if ids != case["ids"]:
                print(f"transformers' GGUF tokenizer differs on {case['name']} ({len(ids)} vs {len(case['ids'])} ids)")
    except ImportError:
        print("transformers not installed: no comparison")

    words = sum(len(c["text"].split()) for c in cases)
    ids = sum(len(c["ids"]) for c in cases)
    body = ",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases)
    reference = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, add_bos=False, special=True"
    OUT.write_text(f'{{"reference":{json.dumps(reference)},"cases":[\n{body}\n]}}\n', encoding="utf-8")
    print(f"{OUT}: {len(cases)} texts, {words} words, {ids} ids")


if __name__ == "__main__":
    main()
