//! AWQ's input-scale folding end to end, on tiny Llama checkpoints this test writes itself:
//! `kvant quantize --method awq` with calibration text, then the output is read back.
//!
//! AWQ multiplies each group's input columns by a scale `s` and the host divides the op that
//! produces the input by it: the RMSNorm weight in front of q/k/v and gate/up, v_proj's output
//! rows in front of o_proj, up_proj's rows in front of down_proj. The checks:
//! - each folded norm is the input's divided by a non-trivial `s`, and the group's dequantized
//!   weights are the input's with their columns multiplied by that same `s`;
//! - o_proj's and down_proj's columns carry a scale, and v_proj's and up_proj's rows are divided
//!   by it (besides their own columns scaled by the norm's `s`);
//! - the output's next-token distributions stay close to the input model's, closer than
//!   round-to-nearest's at the same grid (a wrong fold would wreck them);
//! - with grouped-query attention (o_proj's scale cannot be folded into v_proj's shared rows)
//!   the run reports the o_proj groups as unscaled, and leaves o_proj and v_proj's rows unscaled.

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{kvant, text, toml_path, write_registry, Plugin};
use kvant::checkpoint::{save_dense, Checkpoint};
use kvant::eval::{evaluate, tokenize, EvalOptions};
use kvant::packed::load_model;
use kvant_plugin_api::Tensor;
use serde_json::json;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const HEAD_DIM: usize = 16;
const FFN: usize = 128;
const LAYERS: usize = 2;
const VOCAB: usize = 64;
/// Calibration and evaluation windows: 8 of 64 tokens.
const WINDOWS: usize = 8;
const CTX: usize = 64;

/// The AWQ plugin, built once into `target/test-plugins` (the `cargo test` running us holds the
/// lock on the usual target folder).
fn awq_library() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let target = common::repo_root().join("target").join("test-plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(&cargo)
            .current_dir(common::repo_root())
            .args(["build", "--release", "--quiet", "-p", "kvant-awq", "--target-dir"])
            .arg(&target)
            .output()
            .map_err(|e| format!("cannot run {cargo}: {e}"))?;
        if !out.status.success() {
            return Err(format!("building kvant-awq failed:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(target.join("release"))
    });
    let dir = dir.as_ref().unwrap_or_else(|e| panic!("{e}"));
    dir.join(format!("{}kvant_awq{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX))
}

/// A registry with `awq` and `rtn` in `dir`.
fn registry(dir: &Path) -> PathBuf {
    let body = format!(
        "[methods.awq]\nlibrary = {}\n\n[methods.rtn]\nlibrary = {}\n",
        toml_path(&awq_library()),
        toml_path(&Plugin::Rtn.library())
    );
    write_registry(dir, &body)
}

/// Deterministic values with mean 0 and standard deviation 1 (sum of uniforms).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| ((0..4).map(|_| u()).sum::<f32>() - 2.0) * 3f32.sqrt()).collect()
}

/// `tokenizer.json` of a word-level tokenizer: words `w0`..`w62` and `[UNK]`, split on spaces.
fn tokenizer() -> serde_json::Value {
    let mut vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB - 1).map(|i| (format!("w{i}"), json!(i))).collect();
    vocab.insert("[UNK]".into(), json!(VOCAB - 1));
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// Text of words with some structure (each word mostly follows from the last two).
fn corpus(words: usize) -> String {
    let r = noise(words, 99);
    let (mut a, mut b) = (1usize, 2usize);
    let mut out = Vec::with_capacity(words);
    for x in r {
        let next = if x.abs() < 1.0 { (a * 7 + b * 3) % (VOCAB - 1) } else { ((x.abs() * 1000.0) as usize) % (VOCAB - 1) };
        out.push(format!("w{next}"));
        (a, b) = (b, next);
    }
    out.join(" ")
}

fn seed_of(name: &str) -> u64 {
    name.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
}

/// A `[rows, cols]` matrix of noise times `scale`; each `(k, is_column)` of `loud` makes that
/// column or row 8 times larger.
fn matrix(name: &str, [rows, cols]: [usize; 2], scale: f32, loud: &[(usize, bool)]) -> Tensor {
    let mut v: Vec<f32> = noise(rows * cols, seed_of(name)).iter().map(|x| x * scale).collect();
    for &(k, column) in loud {
        for (i, x) in v.iter_mut().enumerate() {
            if (column && i % cols == k) || (!column && i / cols == k) {
                *x *= 8.0;
            }
        }
    }
    Tensor::f32(name, [rows, cols], &v)
}

/// Writes a Llama checkpoint with `kv_heads` key/value heads, whose activations have a few
/// large channels (embedding columns, v_proj and up_proj rows) so AWQ's scales are far from 1.
fn write_model(dir: &Path, kv_heads: usize) {
    let kv = kv_heads * HEAD_DIM;
    let mut tensors = vec![matrix("model.embed_tokens.weight", [VOCAB, HIDDEN], 1.0, &[(5, true), (40, true)])];
    let (w, wf) = (0.6 / (HIDDEN as f32).sqrt(), 0.6 / (FFN as f32).sqrt());
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        tensors.extend([
            matrix(&format!("{p}.self_attn.q_proj.weight"), [HEADS * HEAD_DIM, HIDDEN], w, &[]),
            matrix(&format!("{p}.self_attn.k_proj.weight"), [kv, HIDDEN], w, &[]),
            matrix(&format!("{p}.self_attn.v_proj.weight"), [kv, HIDDEN], w, &[(3, false), (kv - 5, false)]),
            matrix(&format!("{p}.self_attn.o_proj.weight"), [HIDDEN, HEADS * HEAD_DIM], w, &[]),
            matrix(&format!("{p}.mlp.gate_proj.weight"), [FFN, HIDDEN], w, &[]),
            matrix(&format!("{p}.mlp.up_proj.weight"), [FFN, HIDDEN], w, &[(9, false), (100, false)]),
            matrix(&format!("{p}.mlp.down_proj.weight"), [HIDDEN, FFN], wf, &[]),
        ]);
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("{p}.{norm}.weight");
            let v: Vec<f32> = noise(HIDDEN, seed_of(&name)).iter().map(|x| 1.0 + 0.1 * x).collect();
            tensors.push(Tensor::f32(name, [HIDDEN], &v));
        }
    }
    tensors.push(Tensor::f32("model.norm.weight", [HIDDEN], &[1.0; HIDDEN]));
    tensors.push(matrix("lm_head.weight", [VOCAB, HIDDEN], 1.0 / (HIDDEN as f32).sqrt(), &[]));
    let config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": kv_heads, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "torch_dtype": "float32",
    });
    save_dense(dir, &tensors, &config).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer().to_string()).unwrap();
}

/// `kvant --registry REG ARGS...`, which must succeed; returns stdout + stderr.
fn run(reg: &Path, args: &[&str]) -> String {
    let mut all = vec!["--registry", reg.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = kvant(&all);
    let out = text(&o.stdout) + &text(&o.stderr);
    assert!(o.status.success(), "kvant {all:?} failed:\n{out}");
    out
}

/// Quantizes `model` with `method` at 4 bits, groups of 32; returns kvant's output.
fn quantize(reg: &Path, model: &Path, calibration: &Path, out: &Path, method: &str) -> String {
    let (m, c, o) = (model.to_str().unwrap(), calibration.to_str().unwrap(), out.to_str().unwrap());
    let samples = WINDOWS.to_string();
    let seq = CTX.to_string();
    let mut args = vec!["quantize", m, "--method", method, "-o", o, "--set", "group_size=32"];
    if method == "awq" {
        args.extend_from_slice(&["--calibration", c, "--calibration-samples", &samples, "--calibration-seq-len", &seq]);
    } else {
        args.extend_from_slice(&["--set", "bits=4"]);
    }
    run(reg, &args)
}

/// Every tensor of a dense checkpoint folder, as F32.
fn weights(dir: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let c = Checkpoint::open(dir).unwrap();
    c.tensor_names().map(|n| (n.to_string(), c.view(n).unwrap().to_f32())).collect()
}

/// Relative Frobenius distance.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

/// `w` (`[rows, cols]`) with column `i` multiplied by `cols_by[i]` and row `r` divided by `rows_by[r]`.
fn scaled(w: &[f32], cols_by: Option<&[f32]>, rows_by: Option<&[f32]>) -> Vec<f32> {
    let cols = cols_by.map_or_else(|| w.len() / rows_by.unwrap().len(), <[f32]>::len);
    w.iter()
        .enumerate()
        .map(|(k, v)| v * cols_by.map_or(1.0, |s| s[k % cols]) / rows_by.map_or(1.0, |s| s[k / cols]))
        .collect()
}

/// Per column `i` of `[rows, cols]` matrices: the least-squares factor taking `w`'s column to `q`'s.
fn column_scale(q: &[f32], w: &[f32], cols: usize) -> Vec<f32> {
    (0..cols)
        .map(|i| {
            let (mut qw, mut ww) = (0f64, 0f64);
            for (a, b) in q.iter().zip(w).skip(i).step_by(cols) {
                qw += *a as f64 * *b as f64;
                ww += *b as f64 * *b as f64;
            }
            (qw / ww) as f32
        })
        .collect()
}

fn spread(s: &[f32]) -> f32 {
    s.iter().cloned().fold(0f32, f32::max) / s.iter().cloned().fold(f32::INFINITY, f32::min)
}

/// Mean KL divergence of `out`'s next-token distributions from `model`'s on `text`.
fn kl(reg: &Path, model: &Path, out: &Path, text: &Path) -> f64 {
    let registry = common::load_registry(reg).unwrap();
    let (reference, quantized) = (load_model(&registry, model).unwrap(), load_model(&registry, out).unwrap());
    let tokens = tokenize(&model.join("tokenizer.json"), &[text.to_path_buf()]).unwrap();
    let opts = EvalOptions { ctx: CTX, windows: Some(WINDOWS), batch: WINDOWS };
    let r = evaluate(&quantized.model, Some(&reference.model), &tokens, &opts, &mut |_, _| {}).unwrap();
    r.reference.unwrap().kl_mean
}

/// Quantizes a fresh model with `kv_heads`; returns (input weights, dequantized output, kvant's
/// report, the folders).
fn awq_run(kv_heads: usize) -> (std::collections::HashMap<String, Vec<f32>>, std::collections::HashMap<String, Vec<f32>>, String, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, out, dense) = (tmp.path().join("model"), tmp.path().join("awq"), tmp.path().join("dense"));
    write_model(&model, kv_heads);
    let calibration = tmp.path().join("text.txt");
    std::fs::write(&calibration, corpus(4000)).unwrap();
    let reg = registry(tmp.path());
    let report = quantize(&reg, &model, &calibration, &out, "awq");
    run(&reg, &["dequantize", out.to_str().unwrap(), "-o", dense.to_str().unwrap(), "--dtype", "f32"]);
    (weights(&model), weights(&dense), report, tmp)
}

#[test]
fn scales_are_folded_into_norms_and_producer_rows_and_the_model_stays_close() {
    let (input, output, report, tmp) = awq_run(HEADS);
    assert!(!report.contains("without input scaling"), "nothing is unscaled without grouped-query attention:\n{report}");
    let w = |name: &str| &input[name];
    let q = |name: &str| &output[name];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let name = |m: &str| format!("{p}.{m}.weight");
        // The norms: the scale AWQ chose is what they were divided by.
        for (norm, members) in [("input_layernorm", &["self_attn.q_proj", "self_attn.k_proj"][..]), ("post_attention_layernorm", &["mlp.gate_proj"][..])] {
            let s: Vec<f32> = w(&name(norm)).iter().zip(q(&name(norm))).map(|(a, b)| a / b).collect();
            assert!(spread(&s) > 1.4, "{p}.{norm}: scales {s:?} are too even to test anything");
            // Its readers' columns carry the same scale (4-bit rounding aside).
            for m in members {
                let (with, without) = (rel(q(&name(m)), &scaled(w(&name(m)), Some(&s), None)), rel(q(&name(m)), w(&name(m))));
                assert!(with < 0.15 && with < 0.5 * without, "{p}.{m}: columns x scale {with:.3}, unscaled {without:.3}");
            }
        }
        let s_qkv: Vec<f32> = w(&name("input_layernorm")).iter().zip(q(&name("input_layernorm"))).map(|(a, b)| a / b).collect();
        let s_mlp: Vec<f32> =
            w(&name("post_attention_layernorm")).iter().zip(q(&name("post_attention_layernorm"))).map(|(a, b)| a / b).collect();
        // The producers' rows: divided by the scale their consumer's columns carry.
        for (consumer, producer, cols, own) in [("self_attn.o_proj", "self_attn.v_proj", HEADS * HEAD_DIM, &s_qkv), ("mlp.down_proj", "mlp.up_proj", FFN, &s_mlp)] {
            let s = column_scale(q(&name(consumer)), w(&name(consumer)), cols);
            assert!(spread(&s) > 1.4, "{p}.{consumer}: input scales {s:?} are too even to test anything");
            let folded = scaled(w(&name(producer)), Some(own), Some(&s));
            let (with, without) = (rel(q(&name(producer)), &folded), rel(q(&name(producer)), &scaled(w(&name(producer)), Some(own), None)));
            assert!(with < 0.15 && with < 0.5 * without, "{p}.{producer}: rows / consumer scale {with:.3}, not divided {without:.3}");
        }
    }
    // The function: closer to the input than round-to-nearest on the same grid.
    let (model, calibration) = (tmp.path().join("model"), tmp.path().join("text.txt"));
    let reg = tmp.path().join("registry.toml");
    quantize(&reg, &model, &calibration, &tmp.path().join("rtn"), "rtn");
    let (awq, rtn) = (kl(&reg, &model, &tmp.path().join("awq"), &calibration), kl(&reg, &model, &tmp.path().join("rtn"), &calibration));
    println!("mean KL divergence from the input model: awq {awq:.5}, rtn {rtn:.5}");
    assert!(awq < 2e-3 && awq < rtn, "awq {awq} vs rtn {rtn}");
}

#[test]
fn grouped_query_attention_leaves_o_proj_unscaled_and_says_so() {
    let (input, output, report, _tmp) = awq_run(2);
    assert!(report.contains("without input scaling") && report.contains("o_proj"), "kvant's report:\n{report}");
    for l in 0..LAYERS {
        let name = |m: &str| format!("model.layers.{l}.{m}.weight");
        let s_qkv: Vec<f32> = input[&name("input_layernorm")].iter().zip(&output[&name("input_layernorm")]).map(|(a, b)| a / b).collect();
        assert!(spread(&s_qkv) > 1.4, "layer {l}: the q/k/v scales {s_qkv:?} are too even to test anything");
        // o_proj: clipped and rounded, but its columns not scaled; v_proj: only its columns scaled.
        let o = column_scale(&output[&name("self_attn.o_proj")], &input[&name("self_attn.o_proj")], HEADS * HEAD_DIM);
        assert!(spread(&o) < 1.3, "layer {l}: o_proj columns look scaled: {o:?}");
        let v = rel(&output[&name("self_attn.v_proj")], &scaled(&input[&name("self_attn.v_proj")], Some(&s_qkv), None));
        assert!(v < 0.15, "layer {l}: v_proj is not the input with its columns scaled ({v:.3})");
    }
}
