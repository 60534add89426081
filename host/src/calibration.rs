//! Calibration, shared by every method that declares `requires_calibration`: calibration text to
//! token windows, then the model run block by block as the reference tools do. Each block sees
//! inputs produced by the already-quantized blocks before it; inside a block, with
//! `true_sequential`, the groups (q,k,v) -> o -> (gate,up) -> down are quantized in order in one
//! pass: each is observed, quantized and swapped in just before it runs, so each group sees
//! inputs made by the quantized ones before it. Linears that read one input share one observer.
//!
//! Methods that search input scales (AWQ, [`Plan::fold_input_scales`]) run differently: each
//! block is observed once in full precision, its groups are quantized in reverse order through
//! `quantize_group`, and each returned input scale is folded into the op producing the group's
//! input (a norm weight or a Linear's output rows) before that op is itself quantized. The
//! folded dense tensors are handed back so the checkpoint stores them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvant_plugin_api::ffi::{MethodClient, ObserverHandle};
use kvant_plugin_api::{Config, ModulePlan, Plan, Quantized, Tensor, TensorView};

use crate::checkpoint::Checkpoint;
use crate::lifecycle::{check_against_plan, module_views};
use crate::model::bf16::{self, Bf16Linear};
use crate::model::{DenseLinear, GroupEvent, LinearOp, LlamaModel, BLOCK_LINEARS};
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
    /// Run the calibration forwards with BF16 products (F32 sums) where the CPU has
    /// AVX512-BF16: about twice as fast; the method still receives F32 inputs.
    pub bf16_products: bool,
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        CalibrationSpec { paths: Vec::new(), n_samples: 128, seq_len: 512, seed: 0, bf16_products: true }
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
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        bail!(
            "the calibration text ({}) gives {} tokens: {available} windows of {}, but {} are needed; add text or lower \
             --calibration-samples / --calibration-seq-len",
            names.join(", "),
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

/// Receives each quantized module with the dense weights its packed tensors stand for (for the
/// error report), and writes it.
pub type Emit<'a> = dyn FnMut(&ModulePlan, &Quantized, &[TensorView<'_>]) -> Result<()> + 'a;

/// Quantizes the planned modules of `model` (loaded from `checkpoint`, whose original weights
/// the method receives) block by block on calibration `tokens`
/// (`spec.n_samples` windows of `spec.seq_len`), replacing each by its packed version as soon as it is
/// done, and handing every result to `emit` (which writes it). Returns the dense tensors that
/// input-scale folding changed (full names, F32), which the output must store instead of the
/// checkpoint's.
#[allow(clippy::too_many_arguments)]
pub fn quantize_calibrated(
    checkpoint: &Checkpoint,
    model: &mut LlamaModel,
    method: &Arc<MethodClient>,
    config: &Config,
    plan: &Plan,
    tokens: &[u32],
    spec: &CalibrationSpec,
    true_sequential: bool,
    bar: &Bar,
    emit: &mut Emit,
) -> Result<Vec<(String, Tensor)>> {
    let (n_samples, seq_len) = (spec.n_samples, spec.seq_len);
    if plan.fold_input_scales {
        return quantize_folded(checkpoint, model, method, config, plan, tokens, (n_samples, seq_len), bar, emit);
    }
    let bf16 = spec.bf16_products && bf16::available();
    let mut hidden = model.embed(tokens)?;
    for block in 0..model.config().num_layers {
        // The observer of the group being fed, with the group's planned members.
        let mut current: Option<(Vec<(usize, &ModulePlan)>, ObserverHandle<'_>)> = None;
        if true_sequential {
            // One pass per block: each group is observed, quantized and swapped in just before
            // it runs, so later groups see inputs made by quantized ones and the block's output
            // (the next block's input) comes through quantized layers.
            let mut hook = |block: usize, group: &[usize], event: GroupEvent<'_>| -> Result<Vec<(usize, Box<dyn LinearOp>)>> {
                match feed(method, config, plan, &mut current, block, group, event)? {
                    Some((members, observer)) => quantize_members(checkpoint, method, config, bar, &members, &observer, bf16, emit),
                    None => Ok(Vec::new()),
                }
            };
            model.forward_block_with(block, &mut hidden, n_samples, seq_len, &mut hook)?;
        } else {
            // Every group observes the block's inputs as they are; then all are quantized and
            // the block is re-run through them for the next block's input.
            let mut observed = Vec::new();
            let mut hook = |block: usize, group: &[usize], event: GroupEvent<'_>| -> Result<Vec<(usize, Box<dyn LinearOp>)>> {
                observed.extend(feed(method, config, plan, &mut current, block, group, event)?);
                Ok(Vec::new())
            };
            model.forward_block_with(block, &mut hidden.clone(), n_samples, seq_len, &mut hook)?;
            for (members, observer) in observed {
                for (j, op) in quantize_members(checkpoint, method, config, bar, &members, &observer, bf16, emit)? {
                    let (_, m) = members.iter().find(|(k, _)| *k == j).expect("a member's index");
                    model.replace_linear(&m.name, op)?;
                }
            }
            model.forward_block(block, &mut hidden, n_samples, seq_len)?;
        }
    }
    Ok(Vec::new())
}

/// The planned modules among `group` (indices into [`BLOCK_LINEARS`]) of `block`, with their
/// indices.
fn planned_members<'p>(plan: &'p Plan, block: usize, group: &[usize]) -> Vec<(usize, &'p ModulePlan)> {
    group
        .iter()
        .filter_map(|&j| {
            let full = format!("model.layers.{block}.{}", BLOCK_LINEARS[j]);
            plan.modules.iter().find(|m| m.name == full).map(|m| (j, m))
        })
        .collect()
}

/// A group's planned members and the one observer they share (they read the same input).
type FedGroup<'p, 'm> = (Vec<(usize, &'p ModulePlan)>, ObserverHandle<'m>);

/// Feeds a group's input to its observer (created at the group's first input, when the group has
/// planned members); at the group's completion, hands back the members and the fed observer.
fn feed<'p, 'm>(
    method: &'m MethodClient,
    config: &Config,
    plan: &'p Plan,
    current: &mut Option<FedGroup<'p, 'm>>,
    block: usize,
    group: &[usize],
    event: GroupEvent<'_>,
) -> Result<Option<FedGroup<'p, 'm>>> {
    let name = &method.info().name;
    match event {
        GroupEvent::Input { x, rows } => {
            if current.is_none() {
                let members = planned_members(plan, block, group);
                let Some(&(_, first)) = members.first() else { return Ok(None) };
                let observer =
                    method.new_observer(first, config).map_err(|e| anyhow!("method `{name}`: `{}`: {e}", first.name))?;
                *current = Some((members, observer));
            }
            let (members, observer) = current.as_ref().expect("set above");
            observer.observe(x, rows).map_err(|e| anyhow!("method `{name}` observing `{}`: {e}", members[0].1.name))?;
            Ok(None)
        }
        GroupEvent::Complete => Ok(current.take()),
    }
}

/// Quantizes the planned members of a group (index, plan) from their checkpoint weights and
/// the group's observer, in one call so the method can share work between them; writes them,
/// and returns the Linears later calibration forwards run them as: their packed form, or with
/// `bf16`, their dequantized weights in BF16.
#[allow(clippy::too_many_arguments)]
fn quantize_members(
    checkpoint: &Checkpoint,
    method: &Arc<MethodClient>,
    config: &Config,
    bar: &Bar,
    members: &[(usize, &ModulePlan)],
    observer: &ObserverHandle<'_>,
    bf16: bool,
    emit: &mut Emit,
) -> Result<Vec<(usize, Box<dyn LinearOp>)>> {
    let name = &method.info().name;
    let plans: Vec<&ModulePlan> = members.iter().map(|(_, m)| *m).collect();
    for m in &plans {
        bar.step(&m.name);
    }
    let views: Vec<Vec<TensorView<'_>>> = plans.iter().map(|m| module_views(checkpoint, &m.name)).collect::<Result<_>>()?;
    let observers = vec![Some(observer); plans.len()];
    let results = method
        .quantize_group(&plans, &views, &observers, config)
        .map_err(|e| anyhow!("method `{name}` failed on the group of `{}`: {e}", plans[0].name))?;
    let mut linears = Vec::with_capacity(members.len());
    for ((&(j, m), q), views) in members.iter().zip(results).zip(&views) {
        check_against_plan(m, &q.tensors).with_context(|| format!("method `{name}` returned bad tensors"))?;
        ensure!(q.input_scale.is_none(), "method `{name}` returned an input scale for `{}`, which this plan cannot fold", m.name);
        let op = if bf16 {
            let tensors: Vec<TensorView<'_>> = q.tensors.iter().map(Tensor::view).collect();
            let bias = tensors.iter().find(|t| t.name == "bias").map(TensorView::to_f32);
            let (out, inp) = m.shape;
            let linear = method
                .dequantize_with(m, &tensors, config, |w| Bf16Linear::new(w, bias, out, inp))
                .map_err(|e| anyhow!("method `{name}` dequantizing `{}`: {e}", m.name))??;
            drop(tensors);
            finish_module(method, config, bar, m, q, views, emit)?;
            Box::new(linear) as Box<dyn LinearOp>
        } else {
            finish_module(method, config, bar, m, q, views, emit)?
        };
        linears.push((j, op));
    }
    Ok(linears)
}

/// Reports and writes one quantized module and returns its packed Linear; `reference` is the
/// dense weight its packed tensors stand for.
#[allow(clippy::too_many_arguments)]
fn finish_module(
    method: &Arc<MethodClient>,
    config: &Config,
    bar: &Bar,
    m: &ModulePlan,
    q: Quantized,
    reference: &[TensorView<'_>],
    emit: &mut Emit,
) -> Result<Box<dyn LinearOp>> {
    let loss = q.loss.map_or(String::new(), |l| format!("  loss {l:.6}"));
    bar.println(&format!("{:<44}{loss}", m.name));
    emit(m, &q, reference)?;
    Ok(Box::new(PackedLinear::new(method.clone(), m.clone(), q.tensors, config.clone())))
}

/// What produces a group's input, where an input scale can be folded.
enum Producer {
    /// A block RMSNorm weight (full tensor name).
    Norm(String),
    /// The output rows of a block Linear (index into [`BLOCK_LINEARS`]).
    Rows(usize),
}

/// The Llama block's input-sharing groups in execution order: members (indices into
/// [`BLOCK_LINEARS`]) and producer.
fn scaled_groups(block: usize) -> [(Vec<usize>, Producer); 4] {
    let norm = |n: &str| Producer::Norm(format!("model.layers.{block}.{n}.weight"));
    [
        (vec![0, 1, 2], norm("input_layernorm")),
        (vec![3], Producer::Rows(2)),
        (vec![4, 5], norm("post_attention_layernorm")),
        (vec![6], Producer::Rows(5)),
    ]
}

/// Dense tensors changed by folding so far, by full name (F32).
type Overrides = HashMap<String, Tensor>;

/// A module's tensors (relative names): folded versions where there are some, else the checkpoint's.
fn current_views<'a>(checkpoint: &'a Checkpoint, overrides: &'a Overrides, module: &str) -> Result<Vec<TensorView<'a>>> {
    Ok(module_views(checkpoint, module)?
        .into_iter()
        .map(|v| overrides.get(&format!("{module}.{}", v.name)).map_or(v, Tensor::view))
        .collect())
}

/// The current F32 values of a full tensor name.
fn current_f32(checkpoint: &Checkpoint, overrides: &Overrides, full: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    match overrides.get(full) {
        Some(t) => Ok((t.shape.clone(), t.view().to_f32())),
        None => {
            let v = checkpoint.view(full)?;
            Ok((v.shape.to_vec(), v.to_f32()))
        }
    }
}

/// Divides the output of `module`'s rows by `s` (weight rows and bias), or, with `columns`,
/// multiplies its weight columns by `s`; records the result in `overrides`.
fn rescale_linear(checkpoint: &Checkpoint, overrides: &mut Overrides, module: &str, s: &[f32], columns: bool) -> Result<()> {
    let full = format!("{module}.weight");
    let (shape, mut w) = current_f32(checkpoint, overrides, &full)?;
    let [out, inp] = shape[..] else { bail!("`{full}` is not a matrix") };
    ensure!(s.len() == if columns { inp } else { out }, "input scale of {} values does not fit `{full}` {shape:?}", s.len());
    for (o, row) in w.chunks_mut(inp).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = if columns { *v * s[i] } else { *v / s[o] };
        }
    }
    overrides.insert(full, Tensor::f32("weight", shape, &w));
    let bias = format!("{module}.bias");
    if !columns && checkpoint.spec(&bias).is_some() {
        let (shape, mut b) = current_f32(checkpoint, overrides, &bias)?;
        b.iter_mut().zip(s).for_each(|(b, s)| *b /= s);
        overrides.insert(bias, Tensor::f32("bias", shape, &b));
    }
    Ok(())
}

/// Puts the folded dense version of an unplanned block Linear into the model.
fn refresh_dense(checkpoint: &Checkpoint, overrides: &Overrides, model: &mut LlamaModel, module: &str) -> Result<()> {
    let (shape, w) = current_f32(checkpoint, overrides, &format!("{module}.weight"))?;
    let bias_name = format!("{module}.bias");
    let bias = match checkpoint.spec(&bias_name) {
        Some(_) => Some(current_f32(checkpoint, overrides, &bias_name)?.1),
        None => None,
    };
    model.replace_linear(module, Box::new(DenseLinear::new(w.into(), bias, shape[0], shape[1])?))?;
    Ok(())
}

/// The AWQ order (see the module doc): one full-precision observation per block, groups in
/// reverse, input scales folded into their producers before those are quantized.
#[allow(clippy::too_many_arguments)]
fn quantize_folded(
    checkpoint: &Checkpoint,
    model: &mut LlamaModel,
    method: &Arc<MethodClient>,
    config: &Config,
    plan: &Plan,
    tokens: &[u32],
    (n_samples, seq_len): (usize, usize),
    bar: &Bar,
    emit: &mut Emit,
) -> Result<Vec<(String, Tensor)>> {
    let name = method.info().name.clone();
    let mut overrides = Overrides::new();
    let mut unscaled = Vec::new();
    let mut hidden = model.embed(tokens)?;
    for block in 0..model.config().num_layers {
        let groups = scaled_groups(block);
        let members: Vec<Vec<&ModulePlan>> =
            groups.iter().map(|(g, _)| planned_members(plan, block, g).into_iter().map(|(_, m)| m).collect()).collect();
        // Members of a group share one input, hence one observer.
        let observers: Vec<Option<ObserverHandle<'_>>> = members
            .iter()
            .map(|m| {
                m.first()
                    .map(|first| method.new_observer(first, config).map_err(|e| anyhow!("method `{name}`: `{}`: {e}", first.name)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let mut observe = |_: usize, group: &[usize], event: GroupEvent<'_>| -> Result<Vec<(usize, Box<dyn LinearOp>)>> {
            let GroupEvent::Input { x, rows } = event else { return Ok(Vec::new()) };
            if let Some(k) = groups.iter().position(|(g, _)| g == group) {
                if let Some(observer) = &observers[k] {
                    observer.observe(x, rows).map_err(|e| anyhow!("method `{name}` observing `{}`: {e}", members[k][0].name))?;
                }
            }
            Ok(Vec::new())
        };
        // Folding leaves the full-precision block unchanged, so this pass also gives the next
        // block its input (AutoAWQ feeds the next block the full-precision output too).
        model.forward_block_with(block, &mut hidden, n_samples, seq_len, &mut observe)?;
        for ((group, producer), (members, observer)) in groups.iter().zip(members.iter().zip(&observers)).rev() {
            let Some(observer) = observer else { continue };
            let prefix = format!("model.layers.{block}");
            let full = |j: usize| format!("{prefix}.{}", BLOCK_LINEARS[j]);
            // o_proj reads the heads' outputs; with grouped-query attention one v_proj row feeds
            // several heads, so one scale per o input cannot be folded there (AutoAWQ skips it too).
            let foldable = match producer {
                Producer::Norm(_) => true,
                Producer::Rows(p) => {
                    checkpoint.spec(&format!("{}.weight", full(*p))).map(|s| s.shape[0]) == Some(members[0].shape.1)
                }
            };
            let views: Vec<Vec<TensorView<'_>>> =
                members.iter().map(|m| current_views(checkpoint, &overrides, &m.name)).collect::<Result<_>>()?;
            for m in members.iter() {
                bar.step(&m.name);
            }
            let results: Vec<Quantized> = if foldable {
                let obs: Vec<Option<&ObserverHandle<'_>>> = members.iter().map(|_| Some(observer)).collect();
                method
                    .quantize_group(members, &views, &obs, config)
                    .map_err(|e| anyhow!("method `{name}` failed on the group of `{}`: {e}", members[0].name))?
            } else {
                unscaled.push(members[0].name.clone());
                members.iter().zip(&views).map(|(m, v)| quantize_one(method, config, m, v, observer)).collect::<Result<_>>()?
            };
            let scale = results[0].input_scale.clone();
            for (m, q) in members.iter().zip(&results) {
                check_against_plan(m, &q.tensors).with_context(|| format!("method `{name}` returned bad tensors"))?;
                ensure!(
                    q.input_scale == scale && (foldable || scale.is_none()),
                    "method `{name}`: the members of the group of `{}` came back with different input scales, or scaled \
                     where nothing can fold them",
                    members[0].name
                );
            }
            // The weights each packed module stands for: the given ones with their columns scaled.
            let references: Vec<Tensor> = members
                .iter()
                .zip(&views)
                .map(|(m, v)| {
                    let w = v.iter().find(|t| t.name == "weight").ok_or_else(|| anyhow!("`{}` has no weight", m.name))?;
                    let mut w = w.to_f32();
                    if let Some(s) = &scale {
                        w.chunks_mut(m.shape.1).for_each(|row| row.iter_mut().zip(s).for_each(|(v, s)| *v *= s));
                    }
                    Ok(Tensor::f32("weight", [m.shape.0, m.shape.1], &w))
                })
                .collect::<Result<_>>()?;
            drop(views);
            if let Some(s) = &scale {
                ensure!(s.len() == members[0].shape.1 && s.iter().all(|v| v.is_finite() && *v > 0.0), "method `{name}` returned an unusable input scale for the group of `{}`", members[0].name);
                match producer {
                    Producer::Norm(norm) => {
                        let (shape, mut w) = current_f32(checkpoint, &overrides, norm)?;
                        w.iter_mut().zip(s).for_each(|(w, s)| *w /= s);
                        model.set_norm(norm, w.clone())?;
                        overrides.insert(norm.clone(), Tensor::f32("weight", shape, &w));
                    }
                    Producer::Rows(p) => {
                        rescale_linear(checkpoint, &mut overrides, &full(*p), s, false)?;
                        if !plan.modules.iter().any(|m| m.name == full(*p)) {
                            refresh_dense(checkpoint, &overrides, model, &full(*p))?;
                        }
                    }
                }
                // Readers of the same input that stay dense take the scale in their columns.
                for &j in group.iter().filter(|&&j| !members.iter().any(|m| m.name == full(j))) {
                    rescale_linear(checkpoint, &mut overrides, &full(j), s, true)?;
                    refresh_dense(checkpoint, &overrides, model, &full(j))?;
                }
            }
            for ((m, q), reference) in members.iter().zip(results).zip(&references) {
                let mut refs = vec![reference.view()];
                refs.extend(module_views(checkpoint, &m.name)?.into_iter().filter(|v| v.name == "bias"));
                let op = finish_module(method, config, bar, m, q, &refs, emit)?;
                model.replace_linear(&m.name, op)?;
                // A planned module's folded weights are spent once it is quantized.
                overrides.remove(&format!("{}.weight", m.name));
                overrides.remove(&format!("{}.bias", m.name));
            }
        }
    }
    if !unscaled.is_empty() {
        let msg = format!(
            "{} group(s) quantized without input scaling: their producer cannot take a per-channel scale (o_proj \
             behind a grouped-query v_proj); first: {}",
            unscaled.len(),
            unscaled[0]
        );
        log::warn!("{msg}");
        bar.println(&msg);
    }
    let mut replaced: Vec<(String, Tensor)> = overrides.into_iter().collect();
    replaced.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(replaced)
}

/// Quantizes one module from its weights and its observer.
fn quantize_one(
    method: &MethodClient,
    config: &Config,
    plan: &ModulePlan,
    views: &[TensorView<'_>],
    observer: &ObserverHandle<'_>,
) -> Result<Quantized> {
    let q = method
        .quantize(plan, views, Some(observer), config)
        .map_err(|e| anyhow!("method `{}` failed on module `{}`: {e}", method.info().name, plan.name))?;
    check_against_plan(plan, &q.tensors).with_context(|| format!("method `{}` returned bad tensors", method.info().name))?;
    Ok(q)
}
