//! The decoder: embedding, blocks of (RMSNorm, rotary GQA attention, RMSNorm, SwiGLU MLP) with
//! residual connections, final RMSNorm and LM head.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::linear::{DenseLinear, LinearOp};
use super::ops::{attention, rms_norm, silu_mul, AttnShape, Rope};
use super::{LlamaConfig, TensorSource};
use crate::checkpoint::Checkpoint;

/// The Linears of one decoder block, relative to `model.layers.{i}.`, in execution order.
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The groups of [`BLOCK_LINEARS`] that read one input, in execution order: q/k/v, o,
/// gate/up, down.
pub const INPUT_GROUPS: [&[usize]; 4] = [&[Q, K, V], &[O], &[GATE, UP], &[DOWN]];

/// What a [`GroupHook`] is told about a group of Linears that read one input.
pub enum GroupEvent<'x> {
    /// Some rows of the group's input (row-major `[rows, in_features]`); a block's rows arrive
    /// in several such batches, whole windows each.
    Input {
        /// The input rows.
        x: &'x [f32],
        /// How many rows `x` holds.
        rows: usize,
    },
    /// Every row of the input was seen and the group is about to run.
    Complete,
}

/// Follows a block run group by group ([`INPUT_GROUPS`], in order): called with the block, the
/// group (indices into [`BLOCK_LINEARS`]) and the event. On [`GroupEvent::Complete`] it may
/// return replacements (index, Linear) for members of the group: the block then computes the
/// group's outputs with them, and they stay in the model. This is how calibration quantizes a
/// block in one pass: each group sees inputs produced by the already-quantized groups before it.
/// Replacements returned for an `Input` event are an error.
pub type GroupHook<'a> = dyn FnMut(usize, &[usize], GroupEvent<'_>) -> Result<Vec<(usize, Box<dyn LinearOp>)>> + 'a;

/// Rows a block processes at once: whole windows, about this many rows, so activations of
/// long calibration runs are allocated (and their memory reused) in moderate pieces.
const CHUNK_ROWS: usize = 4096;

/// Supplies a Linear by its full module name (e.g. `model.layers.0.self_attn.q_proj`, or
/// `lm_head` when the head is not tied); `None` loads the dense layer from the tensor source.
pub type LinearFactory<'a> = dyn FnMut(&str) -> Result<Option<Box<dyn LinearOp>>> + 'a;

struct Block {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    /// In [`BLOCK_LINEARS`] order.
    linears: Vec<Box<dyn LinearOp>>,
    /// Full module names, in the same order.
    names: Vec<String>,
}

/// A Llama-family decoder ready to run in F32.
///
/// Activations are row-major `[batch * seq, width]`: `batch` independent windows of `seq`
/// tokens, each starting at position 0.
pub struct LlamaModel {
    config: LlamaConfig,
    /// `[vocab, hidden]`, shared with a tied LM head.
    embed: Arc<[f32]>,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    lm_head: Box<dyn LinearOp>,
    inv_freq: Vec<f64>,
}

impl LlamaModel {
    /// Opens a Hugging Face folder with dense weights.
    pub fn open(dir: impl AsRef<Path>) -> Result<LlamaModel> {
        let dir = dir.as_ref();
        let ckpt = Checkpoint::open(dir)?;
        let config = LlamaConfig::from_json(ckpt.config())
            .with_context(|| format!("{}: unsupported config.json", dir.display()))?;
        LlamaModel::load(config, &ckpt, &mut |_| Ok(None))
    }

    /// Builds the model from `source`, asking `linears` first for every Linear (see
    /// [`LinearFactory`]); norms and the embedding always come from `source`.
    pub fn load(config: LlamaConfig, source: &dyn TensorSource, linears: &mut LinearFactory) -> Result<LlamaModel> {
        let c = &config;
        let (h, q_out, kv_out) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embed: Arc<[f32]> = load_tensor(source, "model.embed_tokens.weight", &[c.vocab_size, h])?.into();
        let shapes = [(q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (c.intermediate_size, h), (c.intermediate_size, h), (h, c.intermediate_size)];
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let prefix = format!("model.layers.{i}");
            let mut ops = Vec::with_capacity(BLOCK_LINEARS.len());
            let mut names = Vec::with_capacity(BLOCK_LINEARS.len());
            for (rel, &(out, inp)) in BLOCK_LINEARS.iter().zip(&shapes) {
                let name = format!("{prefix}.{rel}");
                ops.push(make_linear(source, linears, &name, out, inp)?);
                names.push(name);
            }
            blocks.push(Block {
                input_norm: load_tensor(source, &format!("{prefix}.input_layernorm.weight"), &[h])?,
                post_attention_norm: load_tensor(source, &format!("{prefix}.post_attention_layernorm.weight"), &[h])?,
                linears: ops,
                names,
            });
        }
        let norm = load_tensor(source, "model.norm.weight", &[h])?;
        let lm_head: Box<dyn LinearOp> = if c.tie_word_embeddings || source.shape("lm_head.weight").is_none() {
            Box::new(DenseLinear::new(embed.clone(), None, c.vocab_size, h)?)
        } else {
            make_linear(source, linears, "lm_head", c.vocab_size, h)?
        };
        let inv_freq = config.inv_freq();
        Ok(LlamaModel { config, embed, blocks, norm, lm_head, inv_freq })
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Full names of the decoder blocks' Linears, block by block in execution order.
    pub fn linear_names(&self) -> Vec<&str> {
        self.blocks.iter().flat_map(|b| b.names.iter().map(String::as_str)).collect()
    }

    /// A block Linear by full name.
    pub fn linear(&self, name: &str) -> Option<&dyn LinearOp> {
        self.find(name).map(|(b, j)| self.blocks[b].linears[j].as_ref())
    }

    /// Swaps in another implementation of a block Linear (e.g. its quantized version once
    /// calibration has produced it) and returns the previous one. Shapes must agree.
    pub fn replace_linear(&mut self, name: &str, op: Box<dyn LinearOp>) -> Result<Box<dyn LinearOp>> {
        let (b, j) = self.find(name).with_context(|| format!("the model has no block Linear `{name}`"))?;
        let old = &self.blocks[b].linears[j];
        ensure!(
            (op.out_features(), op.in_features()) == (old.out_features(), old.in_features()),
            "replacement for `{name}` is {}x{}, the layer is {}x{}",
            op.out_features(),
            op.in_features(),
            old.out_features(),
            old.in_features()
        );
        Ok(std::mem::replace(&mut self.blocks[b].linears[j], op))
    }

    /// Replaces the weight of a block's RMSNorm, by full tensor name
    /// (`model.layers.{i}.input_layernorm.weight` or `...post_attention_layernorm.weight`),
    /// e.g. once AWQ input scales were folded into it.
    pub fn set_norm(&mut self, name: &str, weight: Vec<f32>) -> Result<()> {
        let (i, rel) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, rel)| Some((i.parse::<usize>().ok()?, rel)))
            .with_context(|| format!("`{name}` is not a block norm weight"))?;
        let block = self.blocks.get_mut(i).with_context(|| format!("`{name}`: block {i} does not exist"))?;
        let slot = match rel {
            "input_layernorm.weight" => &mut block.input_norm,
            "post_attention_layernorm.weight" => &mut block.post_attention_norm,
            _ => bail!("`{name}` is not a block norm weight"),
        };
        ensure!(weight.len() == slot.len(), "`{name}` has {} values, the model needs {}", weight.len(), slot.len());
        *slot = weight;
        Ok(())
    }

    fn find(&self, name: &str) -> Option<(usize, usize)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (i, rel) = rest.split_once('.')?;
        let b: usize = i.parse().ok()?;
        let j = BLOCK_LINEARS.iter().position(|&r| r == rel)?;
        (b < self.blocks.len()).then_some((b, j))
    }

    /// Token embeddings: `[tokens.len(), hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let mut out = Vec::with_capacity(tokens.len() * h);
        for &t in tokens {
            let t = t as usize;
            ensure!(t < self.config.vocab_size, "token id {t} is outside the vocabulary ({})", self.config.vocab_size);
            out.extend_from_slice(&self.embed[t * h..(t + 1) * h]);
        }
        Ok(out)
    }

    /// Runs decoder block `i` in place on `hidden` (`[batch * seq, hidden]`).
    pub fn forward_block(&self, i: usize, hidden: &mut [f32], batch: usize, seq: usize) -> Result<()> {
        let swapped = self.run_block(i, hidden, batch, seq, None)?;
        debug_assert!(swapped.is_empty());
        Ok(())
    }

    /// Runs decoder block `i` in place on `hidden`, calling `hook` before each input group and
    /// installing the Linears it returns (see [`GroupHook`]).
    pub fn forward_block_with(
        &mut self,
        i: usize,
        hidden: &mut [f32],
        batch: usize,
        seq: usize,
        hook: &mut GroupHook,
    ) -> Result<()> {
        for (j, op) in self.run_block(i, hidden, batch, seq, Some(hook))? {
            let name = self.blocks[i].names[j].clone();
            self.replace_linear(&name, op)?;
        }
        Ok(())
    }

    /// The block's forward; Linears the hook returns are used in place of the block's own and
    /// handed back for the caller to install. Runs stage by stage (one stage per input group),
    /// each stage over chunks of whole windows, so a hook sees all of a group's input before
    /// the group runs.
    fn run_block(
        &self,
        i: usize,
        hidden: &mut [f32],
        batch: usize,
        seq: usize,
        mut hook: Option<&mut GroupHook>,
    ) -> Result<Vec<(usize, Box<dyn LinearOp>)>> {
        let c = &self.config;
        let block = self.blocks.get(i).with_context(|| format!("block {i} does not exist ({} blocks)", self.blocks.len()))?;
        let width = c.hidden_size;
        ensure!(hidden.len() == batch * seq * width, "hidden states are not [{batch} x {seq}, {width}]");
        let per_chunk = (CHUNK_ROWS / seq).max(1);
        // (first window, windows) of each chunk.
        let chunks: Vec<(usize, usize)> = (0..batch).step_by(per_chunk).map(|w| (w, per_chunk.min(batch - w))).collect();
        let rows_of = |(w, n): (usize, usize)| w * seq * width..(w + n) * seq * width;

        let mut swapped: Vec<(usize, Box<dyn LinearOp>)> = Vec::new();
        // Inputs computed only to be shown to a hook (the normed states) are skipped without one.
        let observed = hook.is_some();
        let mut tell = |group: usize, event: GroupEvent<'_>, swapped: &mut Vec<(usize, Box<dyn LinearOp>)>| -> Result<()> {
            let Some(hook) = hook.as_mut() else { return Ok(()) };
            let input = matches!(event, GroupEvent::Input { .. });
            let replacements = hook(i, INPUT_GROUPS[group], event)?;
            ensure!(
                !input || replacements.is_empty(),
                "replacements for block {i} came before the group's input was complete"
            );
            for (j, op) in replacements {
                ensure!(INPUT_GROUPS[group].contains(&j), "a replacement for {} came before its group", block.names[j]);
                let old = &block.linears[j];
                ensure!(
                    (op.out_features(), op.in_features()) == (old.out_features(), old.in_features()),
                    "replacement for `{}` is {}x{}, the layer is {}x{}",
                    block.names[j],
                    op.out_features(),
                    op.in_features(),
                    old.out_features(),
                    old.in_features()
                );
                swapped.push((j, op));
            }
            Ok(())
        };
        let run = |j: usize, x: &[f32], rows: usize, swapped: &[(usize, Box<dyn LinearOp>)]| -> Result<Vec<f32>> {
            let op = swapped.iter().rev().find(|(k, _)| *k == j).map_or(&block.linears[j], |(_, op)| op);
            let y = op.forward(x, rows).with_context(|| format!("in {}", block.names[j]))?;
            if y.len() != rows * op.out_features() {
                bail!("{} returned {} values for {rows} rows of {}", block.names[j], y.len(), op.out_features());
            }
            Ok(y)
        };
        let normed = |h: &[f32], weight: &[f32]| {
            // A parallel copy: `to_vec` would be one core's memcpy of the whole chunk.
            let mut x = Vec::new();
            h.par_iter().copied().collect_into_vec(&mut x);
            rms_norm(&mut x, weight, c.rms_norm_eps);
            x
        };

        // q/k/v read the normed hidden state.
        if observed {
            for &ch in &chunks {
                let x = normed(&hidden[rows_of(ch)], &block.input_norm);
                tell(0, GroupEvent::Input { x: &x, rows: ch.1 * seq }, &mut swapped)?;
            }
        }
        tell(0, GroupEvent::Complete, &mut swapped)?;
        // o reads the attention output.
        let rope = Rope::new(&self.inv_freq, seq);
        let mut attn = Vec::with_capacity(chunks.len());
        for &ch in &chunks {
            let rows = ch.1 * seq;
            let x = normed(&hidden[rows_of(ch)], &block.input_norm);
            let mut q = run(Q, &x, rows, &swapped)?;
            let mut k = run(K, &x, rows, &swapped)?;
            let v = run(V, &x, rows, &swapped)?;
            rope.apply(&mut q, seq, c.num_heads);
            rope.apply(&mut k, seq, c.num_kv_heads);
            let shape = AttnShape {
                batch: ch.1,
                seq,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                window: c.sliding_window,
            };
            let a = attention(&q, &k, &v, shape);
            tell(1, GroupEvent::Input { x: &a, rows }, &mut swapped)?;
            attn.push(a);
        }
        tell(1, GroupEvent::Complete, &mut swapped)?;
        // gate/up read the normed hidden state after attention's residual.
        for (&ch, a) in chunks.iter().zip(attn) {
            let rows = ch.1 * seq;
            let h = &mut hidden[rows_of(ch)];
            add_in_place(h, &run(O, &a, rows, &swapped)?);
            if observed {
                let x = normed(h, &block.post_attention_norm);
                tell(2, GroupEvent::Input { x: &x, rows }, &mut swapped)?;
            }
        }
        tell(2, GroupEvent::Complete, &mut swapped)?;
        // down reads silu(gate) * up.
        let mut act = Vec::with_capacity(chunks.len());
        for &ch in &chunks {
            let rows = ch.1 * seq;
            let x = normed(&hidden[rows_of(ch)], &block.post_attention_norm);
            let mut gate = run(GATE, &x, rows, &swapped)?;
            let up = run(UP, &x, rows, &swapped)?;
            gate.par_chunks_mut(1 << 14).zip(up.par_chunks(1 << 14)).for_each(|(g, u)| silu_mul(g, u));
            tell(3, GroupEvent::Input { x: &gate, rows }, &mut swapped)?;
            act.push(gate);
        }
        tell(3, GroupEvent::Complete, &mut swapped)?;
        for (&ch, a) in chunks.iter().zip(act) {
            add_in_place(&mut hidden[rows_of(ch)], &run(DOWN, &a, ch.1 * seq, &swapped)?);
        }
        Ok(swapped)
    }

    /// Applies the final RMSNorm in place.
    pub fn final_norm(&self, hidden: &mut [f32]) {
        rms_norm(hidden, &self.norm, self.config.rms_norm_eps);
    }

    /// The LM head on final-normed hidden states: logits `[rows, vocab]`.
    pub fn lm_head(&self, normed: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.lm_head.forward(normed, rows).context("in lm_head")
    }

    /// Embeds `batch` windows of `seq` tokens (`tokens` is `[batch * seq]`), runs every block and
    /// the final norm; `on_block(i)` is called after block `i`. Returns `[batch * seq, hidden]`.
    pub fn final_hidden(&self, tokens: &[u32], batch: usize, seq: usize, on_block: &mut dyn FnMut(usize)) -> Result<Vec<f32>> {
        ensure!(tokens.len() == batch * seq, "{} tokens are not {batch} windows of {seq}", tokens.len());
        let mut hidden = self.embed(tokens)?;
        for i in 0..self.blocks.len() {
            self.forward_block(i, &mut hidden, batch, seq)?;
            on_block(i);
        }
        self.final_norm(&mut hidden);
        Ok(hidden)
    }

    /// Logits `[batch * seq, vocab]` for `batch` windows of `seq` tokens.
    pub fn forward(&self, tokens: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>> {
        let hidden = self.final_hidden(tokens, batch, seq, &mut |_| {})?;
        self.lm_head(&hidden, batch * seq)
    }
}

fn add_in_place(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(a, x)| {
        for (a, x) in a.iter_mut().zip(x) {
            *a += x;
        }
    });
}

/// Reads a tensor and checks its shape.
fn load_tensor(source: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let found = source.shape(name).with_context(|| format!("missing tensor `{name}`"))?;
    ensure!(found == shape, "tensor `{name}` has shape {found:?}, expected {shape:?}");
    source.tensor_f32(name)
}

/// A Linear from the factory, or else dense from `{name}.weight` and an optional `{name}.bias`
/// (so qwen2's q/k/v biases and llama's `attention_bias`/`mlp_bias` need no config flag).
fn make_linear(
    source: &dyn TensorSource,
    factory: &mut LinearFactory,
    name: &str,
    out: usize,
    inp: usize,
) -> Result<Box<dyn LinearOp>> {
    if let Some(op) = factory(name).with_context(|| format!("building {name}"))? {
        ensure!(
            (op.out_features(), op.in_features()) == (out, inp),
            "{name} was supplied as {}x{}, the architecture needs {out}x{inp}",
            op.out_features(),
            op.in_features()
        );
        return Ok(op);
    }
    let weight = load_tensor(source, &format!("{name}.weight"), &[out, inp])?;
    let bias_name = format!("{name}.bias");
    let bias = match source.shape(&bias_name) {
        Some(_) => Some(load_tensor(source, &bias_name, &[out])?),
        None => None,
    };
    Ok(Box::new(DenseLinear::new(weight.into(), bias, out, inp)?))
}
