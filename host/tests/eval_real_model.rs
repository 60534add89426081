//! The forward pass and evaluation on the real SmolLM2-135M, dequantized to an F32 Hugging Face
//! folder.
//!
//! Material is looked up in the cache folder (`$KVANT_CACHE`, else `<repo>/.cache/kvant`, filled
//! by `scripts/fetch-test-material.sh`):
//! - the model folder: `$KVANT_TEST_HF_MODEL`, else `<cache>/smollm2-f32`
//!   (`config.json`, `model.safetensors`, `tokenizer.json`, as `kvant dequantize --dtype f32`
//!   writes it, and as `scripts/main-job.sh` leaves it);
//! - the text: `<cache>/sotu-2000s.txt`, the 21st-century speeches concatenated in name order.
//!
//! When either is missing the tests print why and pass without checking anything.

#[allow(dead_code)]
mod common;

use std::path::PathBuf;

use kvant::eval::{evaluate, format_table, tokenize, EvalOptions};
use kvant::model::LlamaModel;

/// The model folder and the text, or `None` (with a message) when absent.
fn material() -> Option<(PathBuf, PathBuf)> {
    common::real_model_and_text("sotu-2000s.txt")
}

/// transformers' LlamaForCausalLM on the same folder, text and windows gives 21.98.
#[test]
fn smollm2_f32_perplexity_matches_transformers() {
    let Some((dir, text)) = material() else { return };
    let model = LlamaModel::open(&dir).unwrap();
    let tokens = tokenize(&dir.join("tokenizer.json"), &[text]).unwrap();
    let opts = EvalOptions { ctx: 512, windows: Some(8), batch: 8 };
    let r = evaluate(&model, None, &tokens, &opts, &mut |_, _| {}).unwrap();
    eprintln!("{}", format_table(&r));
    assert_eq!(r.tokens, 8 * 511);
    assert!((r.ppl / 21.98 - 1.0).abs() < 0.005, "perplexity {} is not within 0.5% of 21.98", r.ppl);
}

/// Against itself the model diverges nowhere.
#[test]
fn smollm2_against_itself_has_zero_divergence() {
    let Some((dir, text)) = material() else { return };
    let model = LlamaModel::open(&dir).unwrap();
    let tokens = tokenize(&dir.join("tokenizer.json"), &[text]).unwrap();
    let opts = EvalOptions { ctx: 64, windows: Some(3), batch: 2 };
    let mut calls = 0;
    let r = evaluate(&model, Some(&model), &tokens, &opts, &mut |done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    let s = r.reference.unwrap();
    assert!(s.kl_mean.abs() < 1e-9 && s.kl_max.abs() < 1e-9, "{s:?}");
    assert_eq!(s.top1_agreement, 1.0);
    assert_eq!(s.ppl_ratio, 1.0);
    assert_eq!(s.ppl, r.ppl);
    // One call up front, then 2 batches x (30 + 30 blocks) and 3 windows.
    assert_eq!(calls, 1 + 2 * 60 + 3);
}
