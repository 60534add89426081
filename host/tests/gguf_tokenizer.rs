//! The tokenizer.json rebuilt from the SmolLM2 GGUF encodes text to the ids llama.cpp gives
//! (fixture from scripts/make-tokenizer-fixture.py: several thousand words of the State of the
//! Union speeches and some edge cases), and decodes them back to the same text.
//!
//! Skipped, with a message, when the model is not in the cache (scripts/fetch-test-material.sh).

use std::path::PathBuf;
use std::str::FromStr;

use kvant::gguf::GgufFile;
use kvant::gguf_tokenizer;
use serde_json::Value;
use tokenizers::Tokenizer;

fn cached_model() -> Option<PathBuf> {
    let cache = std::env::var_os("KVANT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/kvant"));
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipped: {} not found; run scripts/fetch-test-material.sh", path.display());
        None
    }
}

fn cases() -> Vec<(String, String, Vec<u32>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-tokenizer-ids.json");
    let fx: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (c["name"].as_str().unwrap().to_string(), c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

#[test]
fn rebuilt_tokenizer_matches_llama_cpp() {
    let Some(path) = cached_model() else { return };
    let files = gguf_tokenizer::build(&GgufFile::open(&path).unwrap()).unwrap();
    // Through the files on disk, as transformers and the eval command load them.
    let dir = tempfile::tempdir().unwrap();
    files.write_to(dir.path()).unwrap();
    let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);

    let (mut words, mut ids) = (0, 0);
    for (name, text, want) in cases() {
        let got = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
            let show = |ids: &[u32]| {
                let end = (at + 6).min(ids.len());
                ids[at.saturating_sub(3)..end].iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect::<Vec<_>>()
            };
            panic!("{name}: ids differ from token {at}: got {:?}, llama.cpp {:?}", show(&got), show(&want));
        }
        assert_eq!(tok.decode(&got, false).unwrap(), text, "{name}: decode(encode(text))");
        words += text.split_whitespace().count();
        ids += got.len();
    }
    eprintln!("{words} words, {ids} ids: identical to llama.cpp");
    assert!(words > 3000);
}

#[test]
fn config_files_name_the_special_tokens() {
    let Some(path) = cached_model() else { return };
    let files = gguf_tokenizer::build(&GgufFile::open(&path).unwrap()).unwrap();
    let c = &files.tokenizer_config;
    assert_eq!(c["bos_token"], "<|im_start|>");
    assert_eq!(c["eos_token"], "<|im_end|>");
    assert_eq!(c["unk_token"], "<|endoftext|>");
    assert_eq!(c["pad_token"], "<|im_end|>");
    assert_eq!(c["add_bos_token"], false);
    assert_eq!(c["model_max_length"], 8192);
    assert!(c["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(c["added_tokens_decoder"].as_object().unwrap().len(), 17);
    assert_eq!(files.special_tokens_map["additional_special_tokens"].as_array().unwrap().len(), 14);
    let tok = Tokenizer::from_str(&files.tokenizer.to_string()).unwrap();
    assert_eq!(tok.encode("<|im_start|>user", true).unwrap().get_ids()[0], 1);
}
