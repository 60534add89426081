//! The calibration pipeline on the real SmolLM2-135M with the `gptq` plugin (the workspace's
//! release build, through `registry.toml`): small calibration sets so the tests stay short.
//!
//! Material as in `eval_real_model.rs`: `<cache>/smollm2-f32` (or `$KVANT_TEST_HF_MODEL`) and the
//! pre-2000 speeches `<cache>/sotu-pre2000.txt`; when missing the tests print why and pass.

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};

use common::{kvant, text};
use kvant::checkpoint::Checkpoint;
use kvant::eval::{evaluate, tokenize, EvalOptions};
use kvant::packed::load_model;
use kvant::registry::Registry;

/// The model folder and the text, or `None` (with a message) when absent.
fn material() -> Option<(PathBuf, PathBuf)> {
    common::real_model_and_text("sotu-pre2000.txt")
}

/// `kvant quantize` with calibration; panics with kvant's output when it fails.
fn quantize(model: &Path, calibration: &Path, out: &Path, method: &str, extra: &[&str]) {
    let mut args = vec![
        "quantize",
        model.to_str().unwrap(),
        "--method",
        method,
        "-o",
        out.to_str().unwrap(),
        "--calibration",
        calibration.to_str().unwrap(),
        "--calibration-samples",
        "8",
        "--calibration-seq-len",
        "128",
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = kvant(&args);
    assert!(o.status.success(), "kvant {args:?} failed:\n{}{}", text(&o.stdout), text(&o.stderr));
}

fn registry() -> Registry {
    let file = common::repo_root().join("registry.toml");
    common::load_registry(&file).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()))
}

/// Perplexity of a (quantized) checkpoint on the first windows of `text`.
fn perplexity(dir: &Path, text: &Path) -> f64 {
    let loaded = load_model(&registry(), dir).unwrap();
    let tokens = tokenize(&dir.join("tokenizer.json"), &[text.to_path_buf()]).unwrap();
    let opts = EvalOptions { ctx: 128, windows: Some(8), batch: 8 };
    evaluate(&loaded.model, None, &tokens, &opts, &mut |_, _| {}).unwrap().ppl
}

/// On the text it was calibrated on, GPTQ must beat round-to-nearest with the same grid: if
/// the pipeline fed a Linear the wrong activations, the compensation would work against it.
#[test]
fn gptq_beats_round_to_nearest_on_its_calibration_text() {
    let Some((model, calibration)) = material() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (gptq, rtn) = (tmp.path().join("gptq"), tmp.path().join("rtn"));
    quantize(&model, &calibration, &gptq, "gptq", &["--set", "bits=3", "--set", "group_size=128"]);
    let o = kvant(&[
        "quantize",
        model.to_str().unwrap(),
        "--method",
        "rtn",
        "--set",
        "bits=3",
        "--set",
        "sym=true",
        "-o",
        rtn.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (p_gptq, p_rtn) = (perplexity(&gptq, &calibration), perplexity(&rtn, &calibration));
    eprintln!("3-bit g128 symmetric, in-sample perplexity: gptq {p_gptq:.3}, rtn {p_rtn:.3}");
    assert!(p_gptq < 0.9 * p_rtn, "gptq {p_gptq} is not clearly below rtn {p_rtn}");
}

/// With `true_sequential`, a block's first group (q/k/v) sees the same inputs either way, and the
/// groups after it see inputs made by the quantized ones: their results differ from a run
/// where every group observes the full-precision block.
#[test]
fn true_sequential_feeds_later_groups_through_quantized_ones() {
    let Some((model, calibration)) = material() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (seq, par) = (tmp.path().join("sequential"), tmp.path().join("parallel"));
    // Only block 0 is quantized, which keeps this quick.
    let only_block_0 = ["--skip", r"re:model\.layers\.([1-9]|[12][0-9])\..*"];
    quantize(&model, &calibration, &seq, "gptq", &[&only_block_0[..], &["--set", "true_sequential=true"]].concat());
    quantize(&model, &calibration, &par, "gptq", &[&only_block_0[..], &["--set", "true_sequential=false"]].concat());
    let (a, b) = (Checkpoint::open(&seq).unwrap(), Checkpoint::open(&par).unwrap());
    let same = |module: &str| {
        let name = format!("model.layers.0.{module}.qweight");
        a.view(&name).unwrap().data == b.view(&name).unwrap().data
    };
    for module in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
        assert!(same(module), "{module} differs, yet it saw the same inputs in both runs");
    }
    for module in ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
        assert!(!same(module), "{module} is identical: it did not see the quantized groups' outputs");
    }
    assert!(a.view("model.layers.1.self_attn.q_proj.weight").is_ok(), "block 1 should have stayed dense");
    // GPTQModel and AutoGPTQ read the settings from quantize_config.json too.
    let read = |f: &str| serde_json::from_slice::<serde_json::Value>(&std::fs::read(seq.join(f)).unwrap()).unwrap();
    assert_eq!(read("quantize_config.json"), read("config.json")["quantization_config"]);
}
