//! Quality of a model on text: perplexity over non-overlapping windows and, against a reference
//! model, the divergence of next-token distributions (the figures llama.cpp's perplexity tool
//! reports in its KL-divergence mode).
//!
//! Each window of `ctx` tokens starts fresh at position 0 without a BOS token, and every
//! position but the last predicts the next token, so a window scores `ctx - 1` tokens.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use crate::model::LlamaModel;

/// How to cut the token stream and how much to run at once.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Tokens per window.
    pub ctx: usize,
    /// Score only the first this many windows; `None` scores every full window.
    pub windows: Option<usize>,
    /// Windows run through the model together (more is faster, up to memory).
    pub batch: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { ctx: 512, windows: None, batch: 8 }
    }
}

/// The outcome of an evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    /// Tokens per window.
    pub ctx: usize,
    /// Windows scored.
    pub windows: usize,
    /// Next-token predictions scored (`windows * (ctx - 1)`).
    pub tokens: usize,
    /// Perplexity: `exp` of the mean negative log-likelihood.
    pub ppl: f64,
    /// Standard error of `ppl`.
    pub ppl_stderr: f64,
    /// Mean negative log-likelihood per token, in nats.
    pub nll: f64,
    /// Wall-clock time of the evaluation, tokenization excluded.
    pub seconds: f64,
    /// Comparison with the reference model, when one was given.
    pub reference: Option<ReferenceStats>,
}

/// How the evaluated model's next-token distributions differ from the reference's, over the
/// same scored tokens.
#[derive(Clone, Debug, Serialize)]
pub struct ReferenceStats {
    /// Perplexity of the reference.
    pub ppl: f64,
    /// Standard error of the reference perplexity.
    pub ppl_stderr: f64,
    /// `ppl / reference ppl`.
    pub ppl_ratio: f64,
    /// Standard error of the ratio.
    pub ppl_ratio_stderr: f64,
    /// Mean of `ln(ppl / reference ppl)` per token, i.e. the mean NLL difference.
    pub ln_ppl_ratio: f64,
    /// Standard error of `ln_ppl_ratio`.
    pub ln_ppl_ratio_stderr: f64,
    /// Mean `KL(reference || model)` per token, in nats.
    pub kl_mean: f64,
    /// Standard error of `kl_mean`.
    pub kl_stderr: f64,
    /// Median per-token KL.
    pub kl_median: f64,
    /// 99th percentile of per-token KL.
    pub kl_p99: f64,
    /// 99.9th percentile of per-token KL.
    pub kl_p999: f64,
    /// Largest per-token KL.
    pub kl_max: f64,
    /// Fraction of tokens where both models rank the same token first.
    pub top1_agreement: f64,
    /// Standard error of `top1_agreement`.
    pub top1_agreement_stderr: f64,
    /// Root mean square of the change in probability of the correct token.
    pub rms_delta_p: f64,
    /// Standard error of `rms_delta_p`.
    pub rms_delta_p_stderr: f64,
}

/// Reads text files, concatenates them in the order given, and encodes the text with a
/// Hugging Face `tokenizer.json`, without special tokens (no BOS).
pub fn tokenize(tokenizer_json: &Path, texts: &[PathBuf]) -> Result<Vec<u32>> {
    ensure!(!texts.is_empty(), "no text to evaluate on");
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json)
        .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", tokenizer_json.display()))?;
    let mut text = String::new();
    for path in texts {
        text += &std::fs::read_to_string(path).with_context(|| format!("cannot read text {}", path.display()))?;
    }
    let enc = tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizing failed: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// Per-token figures before aggregation.
#[derive(Clone, Copy, Default)]
struct TokenStats {
    nll: f64,
    ref_nll: f64,
    kl: f64,
    same_top: bool,
    delta_p: f64,
}

/// Evaluates `model` on `tokens` (and compares it with `reference` when given).
///
/// `progress(done, total)` is called as work completes; a step is one decoder block of one model
/// over a batch of windows, or the scoring of one window.
pub fn evaluate(
    model: &LlamaModel,
    reference: Option<&LlamaModel>,
    tokens: &[u32],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let start = Instant::now();
    let ctx = opts.ctx;
    ensure!(ctx >= 2, "a window needs at least 2 tokens, got ctx = {ctx}");
    ensure!(opts.batch >= 1, "batch must be at least 1");
    let available = tokens.len() / ctx;
    let windows = match opts.windows {
        Some(n) if n > available => {
            bail!(
                "the text gives {} tokens, only {available} windows of {ctx}; {n} were asked for (give more text, or \
                 lower --windows or --ctx)",
                tokens.len()
            )
        }
        Some(n) => n,
        None => available,
    };
    ensure!(
        windows > 0,
        "the text gives {} tokens, less than one window of {ctx}; give more text or a smaller --ctx",
        tokens.len()
    );
    let vocab = model.config().vocab_size;
    if let Some(r) = reference {
        ensure!(
            r.config().vocab_size == vocab,
            "the reference has a vocabulary of {}, the model {vocab}",
            r.config().vocab_size
        );
    }

    let layers = model.config().num_layers + reference.map_or(0, |r| r.config().num_layers);
    let batches: Vec<(usize, usize)> = (0..windows).step_by(opts.batch).map(|w| (w, (w + opts.batch).min(windows))).collect();
    let total: usize = batches.iter().map(|&(a, b)| layers + (b - a)).sum();
    let mut done = 0;
    progress(done, total);

    let mut stats = Vec::with_capacity(windows * (ctx - 1));
    for &(w0, w1) in &batches {
        let n = w1 - w0;
        let toks = &tokens[w0 * ctx..w1 * ctx];
        let mut step = || {
            done += 1;
            progress(done, total);
        };
        let hidden = model.final_hidden(toks, n, ctx, &mut |_| step())?;
        let ref_hidden = match reference {
            Some(r) => Some(r.final_hidden(toks, n, ctx, &mut |_| step())?),
            None => None,
        };
        let h = model.config().hidden_size;
        for w in 0..n {
            // The last position has no next token to predict.
            let rows = ctx - 1;
            let logits = model.lm_head(&hidden[w * ctx * h..(w * ctx + rows) * h], rows)?;
            let ref_logits = match (reference, &ref_hidden) {
                (Some(r), Some(rh)) => {
                    let rh_w = r.config().hidden_size;
                    Some(r.lm_head(&rh[w * ctx * rh_w..(w * ctx + rows) * rh_w], rows)?)
                }
                _ => None,
            };
            let next = &toks[w * ctx + 1..(w + 1) * ctx];
            let window_stats: Vec<TokenStats> = (0..rows)
                .into_par_iter()
                .map(|t| {
                    let m = &logits[t * vocab..(t + 1) * vocab];
                    let r = ref_logits.as_ref().map(|l| &l[t * vocab..(t + 1) * vocab]);
                    token_stats(m, r, next[t] as usize)
                })
                .collect();
            stats.extend(window_stats);
            step();
        }
    }
    let n = stats.len() as f64;
    let (nll, nll_se) = mean_stderr(stats.iter().map(|s| s.nll));
    let reference = reference.map(|_| {
        let (ref_nll, ref_se) = mean_stderr(stats.iter().map(|s| s.ref_nll));
        let (ln_ratio, ln_ratio_se) = mean_stderr(stats.iter().map(|s| s.nll - s.ref_nll));
        let (kl_mean, kl_stderr) = mean_stderr(stats.iter().map(|s| s.kl));
        let mut kls: Vec<f64> = stats.iter().map(|s| s.kl).collect();
        kls.sort_by(f64::total_cmp);
        let agree = stats.iter().filter(|s| s.same_top).count() as f64 / n;
        let (ms_dp, ms_dp_se) = mean_stderr(stats.iter().map(|s| s.delta_p * s.delta_p));
        let rms = ms_dp.sqrt();
        let ratio = ln_ratio.exp();
        ReferenceStats {
            ppl: ref_nll.exp(),
            ppl_stderr: ref_nll.exp() * ref_se,
            ppl_ratio: ratio,
            ppl_ratio_stderr: ratio * ln_ratio_se,
            ln_ppl_ratio: ln_ratio,
            ln_ppl_ratio_stderr: ln_ratio_se,
            kl_mean,
            kl_stderr,
            kl_median: quantile(&kls, 0.5),
            kl_p99: quantile(&kls, 0.99),
            kl_p999: quantile(&kls, 0.999),
            kl_max: *kls.last().unwrap_or(&0.0),
            top1_agreement: agree,
            top1_agreement_stderr: (agree * (1.0 - agree) / (n - 1.0).max(1.0)).sqrt(),
            rms_delta_p: rms,
            rms_delta_p_stderr: if rms > 0.0 { ms_dp_se / (2.0 * rms) } else { 0.0 },
        }
    });
    Ok(EvalResult {
        ctx,
        windows,
        tokens: stats.len(),
        ppl: nll.exp(),
        ppl_stderr: nll.exp() * nll_se,
        nll,
        seconds: start.elapsed().as_secs_f64(),
        reference,
    })
}

/// Log-partition of a logit row: `max + ln(sum(exp(x - max)))`, the sum in f64.
fn log_sum_exp(x: &[f32]) -> (f64, f32) {
    let m = crate::model::max(x);
    (m as f64 + crate::model::sum_exp(x, m).ln(), m)
}

/// Figures of one position from its logit rows and the token that follows.
fn token_stats(m: &[f32], r: Option<&[f32]>, next: usize) -> TokenStats {
    let (lse_m, max_m) = log_sum_exp(m);
    let nll = lse_m - m[next] as f64;
    let Some(r) = r else {
        return TokenStats { nll, ..TokenStats::default() };
    };
    let (lse_r, max_r) = log_sum_exp(r);
    let z_r = (lse_r - max_r as f64).exp();
    // KL(p_r || p_m) = sum p_r (r - m) - lse_r + lse_m, as sum p_r = 1.
    let kl = crate::model::sum_exp_times_diff(r, m, max_r) / z_r - lse_r + lse_m;
    let ref_nll = lse_r - r[next] as f64;
    TokenStats {
        nll,
        ref_nll,
        kl,
        same_top: argmax(m, max_m) == argmax(r, max_r),
        delta_p: (-nll).exp() - (-ref_nll).exp(),
    }
}

/// Index of the first element equal to the known maximum.
fn argmax(x: &[f32], max: f32) -> usize {
    x.iter().position(|&v| v == max).unwrap_or(0)
}

/// Mean and standard error of the mean.
fn mean_stderr(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut n, mut s, mut s2) = (0f64, 0f64, 0f64);
    for x in xs {
        n += 1.0;
        s += x;
        s2 += x * x;
    }
    if n == 0.0 {
        return (0.0, 0.0);
    }
    let mean = s / n;
    let var = (s2 / n - mean * mean).max(0.0);
    (mean, if n > 1.0 { (var / (n - 1.0)).sqrt() } else { 0.0 })
}

/// The `q` quantile of sorted values, interpolating linearly between neighbours.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The result as a plain-text table, one figure per line.
pub fn format_table(r: &EvalResult) -> String {
    let mut out = String::new();
    let mut row = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<26} {value}");
    };
    row("windows x ctx", format!("{} x {} ({} tokens scored)", r.windows, r.ctx, r.tokens));
    row("PPL", format!("{:.4} ± {:.4}", r.ppl, r.ppl_stderr));
    if let Some(s) = &r.reference {
        row("PPL (reference)", format!("{:.4} ± {:.4}", s.ppl, s.ppl_stderr));
        row("PPL ratio", format!("{:.5} ± {:.5}", s.ppl_ratio, s.ppl_ratio_stderr));
        row("mean ln(PPL ratio)", format!("{:.5} ± {:.5}", s.ln_ppl_ratio, s.ln_ppl_ratio_stderr));
        row("mean KLD", format!("{:.6} ± {:.6}", s.kl_mean, s.kl_stderr));
        row("median KLD", format!("{:.6}", s.kl_median));
        row("99% KLD", format!("{:.6}", s.kl_p99));
        row("99.9% KLD", format!("{:.6}", s.kl_p999));
        row("max KLD", format!("{:.6}", s.kl_max));
        row("same top token", format!("{:.3} ± {:.3} %", 100.0 * s.top1_agreement, 100.0 * s.top1_agreement_stderr));
        row("RMS Δp", format!("{:.3} ± {:.3} %", 100.0 * s.rms_delta_p, 100.0 * s.rms_delta_p_stderr));
    }
    row("time", format!("{:.2} s", r.seconds));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_stats_match_direct_formulas() {
        let m: Vec<f32> = (0..40).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.7).collect();
        let r: Vec<f32> = (0..40).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.9).collect();
        let lsm = |x: &[f32]| -> Vec<f64> {
            let z: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
            x.iter().map(|&v| v as f64 - z.ln()).collect()
        };
        let (lm, lr) = (lsm(&m), lsm(&r));
        let kl: f64 = lr.iter().zip(&lm).map(|(a, b)| a.exp() * (a - b)).sum();
        let s = token_stats(&m, Some(&r), 3);
        assert!((s.nll + lm[3]).abs() < 1e-6);
        assert!((s.ref_nll + lr[3]).abs() < 1e-6);
        assert!((s.kl - kl).abs() < 1e-6, "{} vs {kl}", s.kl);
        assert!((s.delta_p - (lm[3].exp() - lr[3].exp())).abs() < 1e-6);
        let top = |x: &[f32]| (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b });
        assert_eq!(s.same_top, top(&m) == top(&r));
        let same = token_stats(&m, Some(&m), 3);
        assert!(same.kl.abs() < 1e-9 && same.same_top && same.delta_p == 0.0);
    }

    #[test]
    fn log_sum_exp_is_stable_for_large_logits() {
        let x = [1000.0f32, 1000.0, -1e30];
        let (lse, _) = log_sum_exp(&x);
        assert!((lse - (1000.0 + 2f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn summaries() {
        let (m, se) = mean_stderr([1.0, 2.0, 3.0, 4.0].into_iter());
        assert_eq!(m, 2.5);
        assert!((se - (1.25f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 3.0], 0.25), 1.5);
    }
}
