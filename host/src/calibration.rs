//! Calibration, shared by every method that declares `requires_calibration`: calibration text to
//! token windows, then the model run block by block as the reference tools do. Each block sees
//! inputs produced by the already-quantized blocks before it; inside a block, with
//! `true_sequential`, the groups (q,k,v) -> o -> (gate,up) -> down are quantized in order and the
//! block is re-run between groups so each group sees inputs made by the ones before it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvant_plugin_api::ffi::{MethodClient, ObserverHandle};
use kvant_plugin_api::{Config, ModulePlan, Plan, Quantized};

use crate::checkpoint::Checkpoint;
use crate::lifecycle::{check_against_plan, module_views};
use crate::model::{LlamaModel, BLOCK_LINEARS};
use crate::packed::PackedLinear;
use crate::progress::Bar;

/// Where calibration data comes from and how much of it to use.
#[derive(Clone, Debug)]
pub struct CalibrationSpec {
    /// Text files, folders of them (`.txt`, `.jsonl`), or JSON-lines files with a `text` field.
    pub paths: Vec<PathBuf>,
    /// Number of windows.
    pub n_samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the window choice.
    pub seed: u64,
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        CalibrationSpec { paths: Vec::new(), n_samples: 128, seq_len: 512, seed: 0 }
    }
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list calibration folder {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() || p.extension().is_some_and(|x| x == "txt" || x == "jsonl"))
            .collect();
        entries.sort();
        for e in entries {
            collect_files(&e, out)?;
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    } else {
        bail!("calibration path {} does not exist", path.display());
    }
    Ok(())
}

fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("cannot read calibration file {}", path.display()))?;
    if !path.extension().is_some_and(|x| x == "jsonl") {
        return Ok(raw);
    }
    let mut text = String::new();
    for (i, line) in raw.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("{}: line {} has no string field `text`", path.display(), i + 1))?;
        text.push_str(t);
        text.push('\n');
    }
    Ok(text)
}

/// Tokenizes the calibration text and picks `n_samples` non-overlapping windows of `seq_len`
/// tokens, the same ones for the same seed. Returns `[n_samples * seq_len]` token ids.
pub fn calibration_tokens(tokenizer_json: &Path, spec: &CalibrationSpec) -> Result<Vec<u32>> {
    ensure!(spec.n_samples > 0 && spec.seq_len > 1, "calibration needs at least 1 window of 2 tokens");
    let mut files = Vec::new();
    for p in &spec.paths {
        collect_files(p, &mut files)?;
    }
    ensure!(!files.is_empty(), "no calibration text: pass --calibration FILE_OR_FOLDER");
    let mut text = String::new();
    for f in &files {
        text += &read_text(f)?;
    }
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json)
        .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", tokenizer_json.display()))?;
    let ids = tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizing the calibration text failed: {e}"))?;
    let ids = ids.get_ids();
    let available = ids.len() / spec.seq_len;
    if available < spec.n_samples {
        bail!(
            "the calibration text gives {} tokens: {available} windows of {}, but {} are needed; add text or lower \
             --calibration-samples / --calibration-seq-len",
            ids.len(),
            spec.seq_len,
            spec.n_samples
        );
    }
    // A seeded Fisher-Yates shuffle of window indices; keep the first n_samples, in text order.
    let mut order: Vec<usize> = (0..available).collect();
    let mut state = spec.seed ^ 0x9E37_79B9_7F4A_7C15;
    for i in (1..order.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    let mut chosen = order[..spec.n_samples].to_vec();
    chosen.sort_unstable();
    Ok(chosen.iter().flat_map(|&w| ids[w * spec.seq_len..(w + 1) * spec.seq_len].iter().copied()).collect())
}

/// Bytes the pipeline holds besides the model: hidden states, one block's activations and the
/// plugin's per-module state (a Hessian-sized square per Linear input, as an upper bound).
pub fn activation_bytes(model: &LlamaModel, rows: usize) -> u64 {
    let c = model.config();
    let widths = c.hidden_size * 4 + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.intermediate_size * 3;
    let observers = 3 * c.hidden_size * c.hidden_size + c.intermediate_size * c.intermediate_size;
    (rows * widths * 4 + observers * 8) as u64
}

/// The groups quantized together inside a block, by index into [`BLOCK_LINEARS`].
fn groups(true_sequential: bool) -> Vec<Vec<usize>> {
    if true_sequential {
        vec![vec![0, 1, 2], vec![3], vec![4, 5], vec![6]]
    } else {
        vec![(0..BLOCK_LINEARS.len()).collect()]
    }
}

/// Quantizes the planned modules of `model` (loaded from `checkpoint`, whose original weights
/// the method receives) block by block on calibration `tokens`
/// (`n_samples` windows of `seq_len`), replacing each by its packed version as soon as it is
/// done, and handing every result to `emit` (which writes it).
#[allow(clippy::too_many_arguments)]
pub fn quantize_calibrated(
    checkpoint: &Checkpoint,
    model: &mut LlamaModel,
    method: &Arc<MethodClient>,
    config: &Config,
    plan: &Plan,
    tokens: &[u32],
    (n_samples, seq_len): (usize, usize),
    true_sequential: bool,
    bar: &Bar,
    emit: &mut dyn FnMut(&ModulePlan, &Quantized) -> Result<()>,
) -> Result<()> {
    let name = method.info().name.clone();
    let mut hidden = model.embed(tokens)?;
    let layers = model.config().num_layers;
    for block in 0..layers {
        for group in groups(true_sequential) {
            let members: Vec<&ModulePlan> = group
                .iter()
                .filter_map(|&j| {
                    let full = format!("model.layers.{block}.{}", BLOCK_LINEARS[j]);
                    plan.modules.iter().find(|m| m.name == full)
                })
                .collect();
            if members.is_empty() {
                continue;
            }
            let observers: Vec<ObserverHandle<'_>> = members
                .iter()
                .map(|m| method.new_observer(m, config).map_err(|e| anyhow!("method `{name}`: `{}`: {e}", m.name)))
                .collect::<Result<_>>()?;
            // Run the block on a copy: only the observed inputs matter here.
            let mut scratch = hidden.clone();
            let mut failure = None;
            let mut observe = |linear: &str, x: &[f32], rows: usize| {
                if let Some(k) = members.iter().position(|m| m.name == linear) {
                    if let Err(e) = observers[k].observe(x, rows) {
                        failure.get_or_insert_with(|| anyhow!("method `{name}` observing `{linear}`: {e}"));
                    }
                }
            };
            model.forward_block(block, &mut scratch, n_samples, seq_len, Some(&mut observe))?;
            drop(scratch);
            if let Some(e) = failure {
                return Err(e);
            }
            for (m, observer) in members.iter().zip(&observers) {
                bar.step(&m.name);
                let q = quantize_one(method, config, m, checkpoint, observer)?;
                let loss = q.loss.map_or(String::new(), |l| format!("  loss {l:.6}"));
                bar.println(&format!("{:<44}{loss}", m.name));
                emit(m, &q)?;
                let packed = PackedLinear::new(method.clone(), (*m).clone(), q.tensors, config.clone());
                model.replace_linear(&m.name, Box::new(packed))?;
            }
        }
        // The next block's input, computed through this block's quantized layers.
        model.forward_block(block, &mut hidden, n_samples, seq_len, None)?;
    }
    Ok(())
}

/// Quantizes one module from its checkpoint weights and its observer.
fn quantize_one(
    method: &MethodClient,
    config: &Config,
    plan: &ModulePlan,
    checkpoint: &Checkpoint,
    observer: &ObserverHandle<'_>,
) -> Result<Quantized> {
    let views = module_views(checkpoint, &plan.name)?;
    let q = method
        .quantize(plan, &views, Some(observer), config)
        .map_err(|e| anyhow!("method `{}` failed on module `{}`: {e}", method.info().name, plan.name))?;
    check_against_plan(plan, &q.tensors).with_context(|| format!("method `{}` returned bad tensors", method.info().name))?;
    Ok(q)
}
