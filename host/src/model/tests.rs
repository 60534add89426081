//! Whole-model tests on tiny random decoders against a loop-by-loop reference.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::json;

use super::ops::tests::attention_reference;
use super::ops::AttnShape;
use super::*;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[derive(Default)]
struct MapSource(HashMap<String, (Vec<usize>, Vec<f32>)>);

impl MapSource {
    fn put(&mut self, name: &str, shape: &[usize], scale: f32) {
        let n = shape.iter().product();
        let seed = name.bytes().fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let v = values(n, seed).iter().map(|x| x * scale).collect();
        self.0.insert(name.to_string(), (shape.to_vec(), v));
    }
    fn get(&self, name: &str) -> &[f32] {
        &self.0[name].1
    }
}

impl TensorSource for MapSource {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get(name).map(|t| t.0.clone())
    }
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.0.get(name).map(|t| t.1.clone()).context("no such tensor")
    }
}

fn tiny_config(model_type: &str, tied: bool) -> LlamaConfig {
    LlamaConfig::from_json(&json!({
        "model_type": model_type, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 50, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": tied
    }))
    .unwrap()
}

fn tiny_source(c: &LlamaConfig, biases: bool, lm_head: bool) -> MapSource {
    let mut s = MapSource::default();
    let (h, qo, kvo, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    s.put("model.embed_tokens.weight", &[c.vocab_size, h], 1.0);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        for (name, out, inp) in [("self_attn.q_proj", qo, h), ("self_attn.k_proj", kvo, h), ("self_attn.v_proj", kvo, h),
            ("self_attn.o_proj", h, qo), ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h), ("mlp.down_proj", h, f)]
        {
            s.put(&format!("{p}.{name}.weight"), &[out, inp], 0.3);
            if biases && name.starts_with("self_attn") && name != "self_attn.o_proj" {
                s.put(&format!("{p}.{name}.bias"), &[out], 0.2);
            }
        }
        s.put(&format!("{p}.input_layernorm.weight"), &[h], 1.0);
        s.put(&format!("{p}.post_attention_layernorm.weight"), &[h], 1.0);
    }
    s.put("model.norm.weight", &[h], 1.0);
    if lm_head {
        s.put("lm_head.weight", &[c.vocab_size, h], 0.5);
    }
    s
}

fn naive_linear(x: &[f32], rows: usize, w: &[f32], b: Option<&[f32]>, out: usize) -> Vec<f32> {
    let inp = w.len() / out;
    let mut y = vec![0f32; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let s: f64 = (0..inp).map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64).sum();
            y[r * out + o] = (s + b.map_or(0.0, |b| b[o] as f64)) as f32;
        }
    }
    y
}

fn naive_rms(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(&v, &w)| (v as f64 * inv * w as f64) as f32)
        })
        .collect()
}

fn naive_rope(x: &mut [f32], seq: usize, heads: usize, hd: usize, theta: f64) {
    for (row, xr) in x.chunks_mut(heads * hd).enumerate() {
        let p = (row % seq) as f64;
        for h in 0..heads {
            for i in 0..hd / 2 {
                let a = p / theta.powf(2.0 * i as f64 / hd as f64);
                let (x1, x2) = (xr[h * hd + i] as f64, xr[h * hd + i + hd / 2] as f64);
                xr[h * hd + i] = (x1 * a.cos() - x2 * a.sin()) as f32;
                xr[h * hd + i + hd / 2] = (x2 * a.cos() + x1 * a.sin()) as f32;
            }
        }
    }
}

/// The decoder spelled out with plain loops, independent of the optimized kernels.
fn reference_logits(c: &LlamaConfig, s: &MapSource, tokens: &[u32], batch: usize, seq: usize) -> Vec<f32> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let rows = batch * seq;
    let emb = s.get("model.embed_tokens.weight");
    let mut hid: Vec<f32> = tokens.iter().flat_map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
    let eps = c.rms_norm_eps as f64;
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let lin = |name: &str, x: &[f32], out: usize| {
            let b = s.0.get(&format!("{p}.{name}.bias")).map(|t| t.1.as_slice());
            naive_linear(x, rows, s.get(&format!("{p}.{name}.weight")), b, out)
        };
        let x = naive_rms(&hid, s.get(&format!("{p}.input_layernorm.weight")), eps);
        let mut q = lin("self_attn.q_proj", &x, c.num_heads * hd);
        let mut k = lin("self_attn.k_proj", &x, c.num_kv_heads * hd);
        let v = lin("self_attn.v_proj", &x, c.num_kv_heads * hd);
        naive_rope(&mut q, seq, c.num_heads, hd, c.rope_theta);
        naive_rope(&mut k, seq, c.num_kv_heads, hd, c.rope_theta);
        let shape = AttnShape { batch, seq, heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: hd, window: None };
        let a = attention_reference(&q, &k, &v, shape);
        let o = lin("self_attn.o_proj", &a, h);
        hid.iter_mut().zip(&o).for_each(|(x, y)| *x += y);
        let x = naive_rms(&hid, s.get(&format!("{p}.post_attention_layernorm.weight")), eps);
        let g = lin("mlp.gate_proj", &x, c.intermediate_size);
        let u = lin("mlp.up_proj", &x, c.intermediate_size);
        let act: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32).collect();
        let d = lin("mlp.down_proj", &act, h);
        hid.iter_mut().zip(&d).for_each(|(x, y)| *x += y);
    }
    let x = naive_rms(&hid, s.get("model.norm.weight"), eps);
    let head = s.0.get("lm_head.weight").filter(|_| !c.tie_word_embeddings).map_or(emb, |t| t.1.as_slice());
    naive_linear(&x, rows, head, None, c.vocab_size)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    values(n, seed).iter().map(|v| ((v + 1.0) / 2.0 * vocab as f32) as u32 % vocab as u32).collect()
}

#[test]
fn forward_matches_reference_for_llama_and_qwen2_shapes() {
    for (model_type, tied, biases, head) in
        [("llama", true, false, false), ("llama", false, false, true), ("qwen2", false, true, true), ("mistral", true, false, true)]
    {
        let c = tiny_config(model_type, tied);
        let s = tiny_source(&c, biases, head);
        let model = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
        let (batch, seq) = (2, 70);
        let toks = tokens(batch * seq, c.vocab_size, 3);
        let got = model.forward(&toks, batch, seq).unwrap();
        let want = reference_logits(&c, &s, &toks, batch, seq);
        let err = max_abs_diff(&got, &want);
        assert!(err < 2e-4, "{model_type} tied={tied} biases={biases}: max logit error {err}");
    }
}

#[test]
fn tied_head_ignores_a_stray_lm_head_tensor() {
    let c = tiny_config("llama", true);
    let s = tiny_source(&c, false, true);
    let mut no_head = tiny_source(&c, false, false);
    no_head.0.remove("lm_head.weight");
    let a = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
    let b = LlamaModel::load(c, &no_head, &mut |_| Ok(None)).unwrap();
    let toks = tokens(10, 50, 9);
    assert_eq!(a.forward(&toks, 1, 10).unwrap(), b.forward(&toks, 1, 10).unwrap());
}

#[test]
fn batched_windows_equal_separate_runs() {
    let c = tiny_config("llama", true);
    let s = tiny_source(&c, false, false);
    let model = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
    let seq = 33;
    let toks = tokens(3 * seq, c.vocab_size, 4);
    let all = model.forward(&toks, 3, seq).unwrap();
    for w in 0..3 {
        let one = model.forward(&toks[w * seq..(w + 1) * seq], 1, seq).unwrap();
        let part = &all[w * seq * c.vocab_size..(w + 1) * seq * c.vocab_size];
        assert!(max_abs_diff(part, &one) < 1e-5, "window {w}");
    }
}

#[test]
fn later_tokens_do_not_change_earlier_logits() {
    let c = tiny_config("llama", true);
    let model = LlamaModel::load(c.clone(), &tiny_source(&c, false, false), &mut |_| Ok(None)).unwrap();
    let mut toks = tokens(40, c.vocab_size, 5);
    let before = model.forward(&toks, 1, 40).unwrap();
    toks[30] = (toks[30] + 1) % 50;
    let after = model.forward(&toks, 1, 40).unwrap();
    let v = c.vocab_size;
    assert_eq!(before[..30 * v], after[..30 * v]);
    assert_ne!(before[30 * v..31 * v], after[30 * v..31 * v]);
}

/// Counts calls and forwards to a dense layer.
struct Counting(DenseLinear, Arc<Mutex<usize>>);

impl LinearOp for Counting {
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        *self.1.lock().unwrap() += 1;
        self.0.forward(x, rows)
    }
    fn in_features(&self) -> usize {
        self.0.in_features()
    }
    fn out_features(&self) -> usize {
        self.0.out_features()
    }
}

#[test]
fn factory_supplies_linears_and_hook_sees_group_inputs() {
    let c = tiny_config("llama", true);
    let s = tiny_source(&c, false, false);
    let calls = Arc::new(Mutex::new(0));
    let mut asked = Vec::new();
    let mut model = LlamaModel::load(c.clone(), &s, &mut |name| {
        asked.push(name.to_string());
        let w = s.tensor_f32(&format!("{name}.weight"))?;
        let shape = s.shape(&format!("{name}.weight")).unwrap();
        Ok(Some(Box::new(Counting(DenseLinear::new(w.into(), None, shape[0], shape[1])?, calls.clone())) as Box<dyn LinearOp>))
    })
    .unwrap();
    assert_eq!(asked.len(), 14);
    assert_eq!(model.linear_names(), asked);

    let (batch, seq) = (2, 9);
    let toks = tokens(batch * seq, c.vocab_size, 6);
    let dense = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
    assert_eq!(model.forward(&toks, batch, seq).unwrap(), dense.forward(&toks, batch, seq).unwrap());
    assert_eq!(*calls.lock().unwrap(), 14);

    let mut hidden = model.embed(&toks).unwrap();
    let mut seen = Vec::new();
    let mut hook = |block: usize, group: &[usize], event: GroupEvent<'_>| {
        seen.push(match event {
            GroupEvent::Input { x, rows } => (block, group.to_vec(), x.len() / rows, rows),
            GroupEvent::Complete => (block, group.to_vec(), 0, 0),
        });
        Ok(Vec::new())
    };
    model.forward_block_with(1, &mut hidden, batch, seq, &mut hook).unwrap();
    let rows = batch * seq;
    assert_eq!(
        seen,
        [
            (1, vec![0, 1, 2], 48, rows),
            (1, vec![0, 1, 2], 0, 0),
            (1, vec![3], 48, rows),
            (1, vec![3], 0, 0),
            (1, vec![4, 5], 48, rows),
            (1, vec![4, 5], 0, 0),
            (1, vec![6], 80, rows),
            (1, vec![6], 0, 0)
        ]
    );
}

/// Long runs go through a block in chunks of whole windows: the hook sees every row once, in
/// order, before the group completes, and the result equals one run over all rows at once.
#[test]
fn chunked_block_equals_one_piece_and_hook_sees_every_row() {
    let c = tiny_config("llama", true);
    let s = tiny_source(&c, false, false);
    let model = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
    let (seq, batch) = (1024, 9);
    let toks = tokens(batch * seq, c.vocab_size, 11);
    let mut chunked = model.embed(&toks).unwrap();
    let mut separate = chunked.clone();
    let mut model = model;
    let mut fed = vec![0usize; 4];
    let mut hook = |_: usize, group: &[usize], event: GroupEvent<'_>| {
        let g = INPUT_GROUPS.iter().position(|g| *g == group).unwrap();
        match event {
            GroupEvent::Input { rows, .. } => {
                assert!(rows % seq == 0 && rows < batch * seq, "{rows} rows are not whole windows of a chunk");
                fed[g] += rows;
            }
            GroupEvent::Complete => assert_eq!(fed[g], batch * seq, "group {g} completed early"),
        }
        Ok(Vec::new())
    };
    model.forward_block_with(0, &mut chunked, batch, seq, &mut hook).unwrap();
    for w in 0..batch {
        let h = c.hidden_size;
        model.forward_block(0, &mut separate[w * seq * h..(w + 1) * seq * h], 1, seq).unwrap();
    }
    let worst = chunked.iter().zip(&separate).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "chunked and per-window runs differ by {worst}");
}

/// A hook that swaps in a zero `o_proj` changes the block's output exactly as replacing the
/// Linear beforehand does, and the replacement stays in the model.
#[test]
fn group_hook_replacements_take_effect_at_once_and_stay() {
    let c = tiny_config("llama", true);
    let s = tiny_source(&c, false, false);
    let zero_o = || Box::new(DenseLinear::new(vec![0.0; 48 * 48].into(), None, 48, 48).unwrap()) as Box<dyn LinearOp>;
    let (batch, seq) = (2, 5);
    let toks = tokens(batch * seq, c.vocab_size, 3);

    let mut hooked = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
    let mut a = hooked.embed(&toks).unwrap();
    let mut hook = |_: usize, group: &[usize], event: GroupEvent<'_>| {
        Ok(if group == [3] && matches!(event, GroupEvent::Complete) { vec![(3, zero_o())] } else { Vec::new() })
    };
    hooked.forward_block_with(0, &mut a, batch, seq, &mut hook).unwrap();

    let mut replaced = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
    replaced.replace_linear("model.layers.0.self_attn.o_proj", zero_o()).unwrap();
    let mut b = replaced.embed(&toks).unwrap();
    replaced.forward_block(0, &mut b, batch, seq).unwrap();
    assert_eq!(a, b);

    let dense = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).unwrap();
    let mut d = dense.embed(&toks).unwrap();
    dense.forward_block(0, &mut d, batch, seq).unwrap();
    assert_ne!(a, d);
    let (mut a2, mut b2) = (hooked.embed(&toks).unwrap(), replaced.embed(&toks).unwrap());
    hooked.forward_block(0, &mut a2, batch, seq).unwrap();
    replaced.forward_block(0, &mut b2, batch, seq).unwrap();
    assert_eq!(a2, b2);

    let mut wrong = |_: usize, group: &[usize], event: GroupEvent<'_>| {
        Ok(if group == [0, 1, 2] && matches!(event, GroupEvent::Complete) { vec![(3, zero_o())] } else { Vec::new() })
    };
    let err = hooked.forward_block_with(0, &mut a2, batch, seq, &mut wrong).unwrap_err();
    assert!(format!("{err:#}").contains("o_proj"), "{err:#}");
}

#[test]
fn replace_linear_checks_name_and_shape() {
    let c = tiny_config("llama", true);
    let s = tiny_source(&c, false, false);
    let mut model = LlamaModel::load(c, &s, &mut |_| Ok(None)).unwrap();
    let name = "model.layers.0.mlp.up_proj";
    let w = s.tensor_f32(&format!("{name}.weight")).unwrap();
    let zeros = DenseLinear::new(vec![0.0; w.len()].into(), None, 80, 48).unwrap();
    let old = model.replace_linear(name, Box::new(zeros)).unwrap();
    assert_eq!((old.out_features(), old.in_features()), (80, 48));
    assert!(model.replace_linear(name, Box::new(DenseLinear::new(vec![0.0; 48].into(), None, 1, 48).unwrap())).is_err());
    assert!(model.replace_linear("model.layers.9.mlp.up_proj", old).is_err());
    assert_eq!(model.linear(name).unwrap().out_features(), 80);
}

#[test]
fn load_reports_wrong_shapes_and_bad_tokens() {
    let c = tiny_config("llama", true);
    let mut s = tiny_source(&c, false, false);
    s.put("model.layers.1.self_attn.k_proj.weight", &[48, 48], 1.0);
    let err = LlamaModel::load(c.clone(), &s, &mut |_| Ok(None)).err().unwrap();
    assert!(format!("{err:#}").contains("k_proj"), "{err:#}");
    let model = LlamaModel::load(c.clone(), &tiny_source(&c, false, false), &mut |_| Ok(None)).unwrap();
    assert!(model.forward(&[1, 2, 50], 1, 3).is_err());
}

/// A deferred Linear computes what the dense one does, reading its weights (and bias) from the
/// checkpoint when it first runs; a missing weight is an error at construction.
#[test]
fn deferred_linear_equals_dense_and_needs_its_weight() {
    use kvant_plugin_api::Tensor;
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<f32> = (0..6 * 4).map(|i| i as f32 / 7.0 - 1.0).collect();
    let b = [0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0];
    let tensors = [Tensor::f32("lin.weight", [6, 4], &w), Tensor::f32("lin.bias", [6], &b)];
    crate::checkpoint::save_dense(dir.path().join("m"), &tensors, &json!({})).unwrap();
    let ckpt = Arc::new(Checkpoint::open(dir.path().join("m")).unwrap());
    let deferred = DeferredLinear::new(ckpt.clone(), "lin").unwrap();
    assert_eq!((deferred.out_features(), deferred.in_features()), (6, 4));
    let dense = DenseLinear::new(w.into(), Some(b.to_vec()), 6, 4).unwrap();
    let x: Vec<f32> = (0..3 * 4).map(|i| (i % 5) as f32 - 2.0).collect();
    assert_eq!(deferred.forward(&x, 3).unwrap(), dense.forward(&x, 3).unwrap());
    assert_eq!(deferred.forward(&x, 3).unwrap(), dense.forward(&x, 3).unwrap());
    let err = DeferredLinear::new(ckpt, "other").err().unwrap();
    assert!(format!("{err:#}").contains("other.weight"), "{err:#}");
}
