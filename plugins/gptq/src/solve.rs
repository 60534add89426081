//! The GPTQ algorithm (Frantar et al., 2022) as GPTQModel and AutoGPTQ run it.
//!
//! Columns are quantized one at a time (in act-order when asked); each column's rounding
//! error, scaled by the inverse Hessian's upper Cholesky factor `U`, is pushed onto the columns
//! not yet quantized: eagerly inside a block of columns, lazily (one matrix product) beyond it.
//! Output rows never interact, so rows are split into chunks solved in parallel, each chunk
//! holding its slice of `W` transposed (`[in][rows]`) so every column step is a contiguous
//! vector operation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kvant_plugin_api::{progress, Error, Result};
use rayon::prelude::*;

use crate::linalg::{cholesky_lower, inverse_cholesky_upper, matmul, Operand};

/// Columns per lazy-update block, as in the reference.
pub const BLOCK: usize = 128;

/// Settings of one GPTQ solve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqParams {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Input columns per group; -1 (or >= in) is one group per output row.
    pub group_size: i64,
    /// Symmetric levels: zero point fixed at `2^(bits-1)`.
    pub sym: bool,
    /// Act-order: quantize columns by decreasing Hessian diagonal.
    pub desc_act: bool,
    /// With groups: compute every group's parameters up front from the original weights.
    pub static_groups: bool,
    /// Dampening added to the Hessian diagonal, as a fraction of its mean.
    pub damp_percent: f64,
    /// Added to `damp_percent` each time the Hessian proves not positive definite.
    pub damp_auto_increment: f64,
    /// Clipping-grid search for group parameters: the error norm exponent (GPTQModel's `mse`,
    /// e.g. 2.4); 0 disables it.
    pub mse: f64,
    /// Keep asymmetric zero points >= 1, because the v1 format stores `zero - 1` unsigned.
    pub zero_at_least_one: bool,
    /// After the solve, refit every group scale of a row jointly, codes fixed, to minimise the
    /// row's output error `(w - q)^T H (w - q)` on the calibration inputs (kvant's addition).
    pub refit_scales: bool,
}

/// What a solve produces, in the original column order.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqOutput {
    /// Codes, row-major `[in, out]` (the transposed weight, as `qweight` packs it).
    pub codes: Vec<u8>,
    /// Scales `[groups, out]`, exactly representable in F16.
    pub scales: Vec<f32>,
    /// Zero points `[groups, out]`.
    pub zeros: Vec<u8>,
    /// Group of each input column.
    pub g_idx: Vec<i32>,
    /// GPTQModel's logged loss: sum of `(w - q)^2 / (2 U_ii^2)` over all weights, over samples.
    pub loss: f64,
    /// The dampening that made the Hessian factorizable.
    pub damp_percent: f64,
}

impl GptqOutput {
    /// The dequantized weight, row-major `[out, in]`.
    pub fn dequantize(&self, out: usize, inp: usize) -> Vec<f32> {
        let mut w = vec![0f32; out * inp];
        for i in 0..inp {
            let g = self.g_idx[i] as usize;
            for o in 0..out {
                let (s, z) = (self.scales[g * out + o], self.zeros[g * out + o] as f32);
                w[o * inp + i] = s * (self.codes[i * out + o] as f32 - z);
            }
        }
        w
    }
}

/// Rounds to the nearest F16 value, avoiding zero: codes are chosen for the stored scale.
fn round_scale(s: f32) -> f32 {
    let r = half::f16::from_f32(s).to_f32();
    if r > 0.0 {
        r
    } else {
        half::f16::from_bits(1).to_f32()
    }
}

/// `clamp(round(x / scale) + zero, 0, maxq)` with ties to even, as `torch.round`. Rounds by
/// adding and removing 1.5 * 2^23 (exact for |v| < 2^22; larger values clamp anyway; strict
/// float semantics keep the compiler from folding it away),
/// which, unlike `round_ties_even`, vectorizes without SSE4.1.
#[inline(always)]
fn quant(x: f32, scale: f32, zero: f32, maxq: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let v = (x / scale).clamp(-4_194_304.0, 4_194_304.0);
    let rounded = (v + MAGIC) - MAGIC;
    (rounded + zero).clamp(0.0, maxq)
}

/// Scale and zero point of one group of one output row, from its values.
///
/// The range always includes 0. Symmetric ranges are `[-amax, amax]` even when the group has
/// no negative value (the reference then keeps `[0, max]`, which clips the top half).
pub fn find_params(vals: &[f32], p: &GptqParams) -> (f32, u8) {
    let maxq = ((1u32 << p.bits) - 1) as f32;
    let (mut lo, mut hi) = vals.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if p.sym {
        let amax = lo.abs().max(hi);
        (lo, hi) = (-amax, amax);
    }
    if lo == 0.0 && hi == 0.0 {
        (lo, hi) = (-1.0, 1.0);
    }
    let zmin = if p.zero_at_least_one { 1.0 } else { 0.0 };
    let candidate = |shrink: f32| {
        let scale = round_scale((hi - lo) * shrink / maxq);
        let zero = if p.sym { (maxq + 1.0) / 2.0 } else { (-lo * shrink / scale).round_ties_even().clamp(zmin, maxq) };
        (scale, zero)
    };
    let mut best = candidate(1.0);
    if p.mse > 0.0 {
        let norm = p.mse as f32;
        let mut best_err = f32::INFINITY;
        // The reference's grid: shrink the range by 1% steps down to 20% of it.
        for i in 0..80 {
            let (scale, zero) = candidate(1.0 - i as f32 / 100.0);
            let err = group_cost(vals, scale, zero, maxq, norm);
            if err < best_err {
                best_err = err;
                best = (scale, zero);
            }
        }
    }
    (best.0, best.1 as u8)
}

/// `sum |scale (quant(v) - zero) - v|^norm` over a group's values: the clipping search's cost
/// of one candidate. On AVX-512 sixteen values at a time (the search is most of the solve's
/// time otherwise); the portable loop computes the same sum in another order.
fn group_cost(vals: &[f32], scale: f32, zero: f32, maxq: f32, norm: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { group_cost_avx512(vals, scale, zero, maxq, norm) };
    }
    let cost = |v: f32| {
        let e = (scale * (quant(v, scale, zero, maxq) - zero) - v).abs();
        if norm == 2.0 {
            e * e
        } else {
            pow_approx(e, norm)
        }
    };
    // Eight running sums so the loop vectorizes (one sum would force sequential adds).
    let mut lanes = [0f32; 8];
    let mut chunks = vals.chunks_exact(8);
    for ch in &mut chunks {
        for l in 0..8 {
            lanes[l] += cost(ch[l]);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| cost(v)).sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// [`group_cost`] with [`quant`] and [`pow_approx`] on 16 lanes: the exponent and mantissa
/// come from `vgetexpps`/`vgetmantps`, `2^n` from `vscalefps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_cost_avx512(vals: &[f32], scale: f32, zero: f32, maxq: f32, norm: f32) -> f32 {
    use std::arch::x86_64::*;
    const MAGIC: f32 = 12_582_912.0;
    let (s, z, q_max) = (_mm512_set1_ps(scale), _mm512_set1_ps(zero), _mm512_set1_ps(maxq));
    let (lim, magic, zero_v, one) = (_mm512_set1_ps(4_194_304.0), _mm512_set1_ps(MAGIC), _mm512_setzero_ps(), _mm512_set1_ps(1.0));
    let p = _mm512_set1_ps(norm);
    let mut acc = _mm512_setzero_ps();
    for start in (0..vals.len()).step_by(16) {
        let n = (vals.len() - start).min(16);
        let mask: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
        let v = _mm512_maskz_loadu_ps(mask, vals.as_ptr().add(start));
        // quant(): clamp(round(v / scale) + zero, 0, maxq), rounding as the scalar code does.
        let x = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, s), _mm512_sub_ps(zero_v, lim)), lim);
        let r = _mm512_sub_ps(_mm512_add_ps(x, magic), magic);
        let q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, z), zero_v), q_max);
        let d = _mm512_sub_ps(_mm512_mul_ps(s, _mm512_sub_ps(q, z)), v);
        let e = _mm512_abs_ps(d);
        let c = if norm == 2.0 {
            _mm512_mul_ps(e, e)
        } else {
            // log2 e = exponent + log2 m, m in [1, 2); ln m = 2 atanh((m-1)/(m+1)) by its series.
            let exponent = _mm512_getexp_ps(e);
            let m = _mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_ZERO>(e);
            let t = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
            let t2 = _mm512_mul_ps(t, t);
            let mut poly = _mm512_set1_ps(1.0 / 9.0);
            for k in [1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
                poly = _mm512_fmadd_ps(poly, t2, _mm512_set1_ps(k));
            }
            let ln_m = _mm512_mul_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(2.0));
            let log2 = _mm512_fmadd_ps(ln_m, _mm512_set1_ps(std::f32::consts::LOG2_E), exponent);
            let y = _mm512_max_ps(_mm512_mul_ps(p, log2), _mm512_set1_ps(-126.0));
            // 2^y = 2^floor(y) e^(frac ln 2), the latter by its Taylor series.
            let fl = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(y);
            let a = _mm512_mul_ps(_mm512_sub_ps(y, fl), _mm512_set1_ps(std::f32::consts::LN_2));
            let mut ex = _mm512_set1_ps(1.0 / 720.0);
            for k in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                ex = _mm512_fmadd_ps(ex, a, _mm512_set1_ps(k));
            }
            // e = 0 (and masked-off lanes) cost nothing.
            let nonzero = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(e, zero_v);
            _mm512_maskz_mov_ps(nonzero & mask, _mm512_scalef_ps(ex, fl))
        };
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mask, c));
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_cost_matches_the_plain_sum() {
        // Group lengths with and without a partial vector; zeros; both norms.
        for (len, seed) in [(128usize, 1u32), (64, 2), (37, 3), (5, 4), (1, 5)] {
            let vals: Vec<f32> = (0..len)
                .map(|i| {
                    let k = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed * 97) % 2001;
                    if k % 13 == 0 { 0.0 } else { (k as f32 - 1000.0) / 3000.0 }
                })
                .collect();
            for norm in [2.4f32, 2.0] {
                for (scale, zero) in [(0.02f32, 8.0f32), (0.0051, 3.0), (0.3, 0.0)] {
                    let got = group_cost(&vals, scale, zero, 15.0, norm) as f64;
                    let want: f64 = vals
                        .iter()
                        .map(|&v| ((scale * (quant(v, scale, zero, 15.0) - zero) - v).abs() as f64).powf(norm as f64))
                        .sum();
                    assert!((got - want).abs() <= 1e-4 * want.max(1e-12), "len {len} norm {norm} scale {scale}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn pow_approx_matches_powf() {
        for &p in &[2.4f32, 1.0, 3.0, 0.5] {
            for k in 0..2000 {
                let x = 1e-6 * 1.013f32.powi(k);
                let (a, b) = (pow_approx(x, p), x.powf(p));
                assert!(((a - b) / b).abs() < 2e-5, "{x}^{p}: {a} vs {b}");
            }
        }
        assert_eq!(pow_approx(0.0, 2.4), 0.0);
    }
}

/// `x^p` for `x >= 0` to about 1e-5 relative: `2^(p log2 x)` with short series, several times
/// cheaper than `powf` (and vectorizable). The clipping search only ranks candidates with it.
fn pow_approx(x: f32, p: f32) -> f32 {
    if x <= 0.0 {
        return 0.0;
    }
    // log2 x = exponent + log2 m, m in [1, 2); ln m = 2 atanh((m-1)/(m+1)) by its series.
    let bits = x.to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32 - 127;
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let ln_m = 2.0 * t * (1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 / 9.0))));
    let y = (p * (exponent as f32 + ln_m * std::f32::consts::LOG2_E)).max(-126.0);
    // 2^y = 2^n 2^f, f in [0, 1), 2^f = e^(f ln 2) by its Taylor series.
    // floor without a libm call: truncate, then step down for negative fractions.
    let t = y as i32;
    let n = if (t as f32) > y { t - 1 } else { t };
    let a = (y - n as f32) * std::f32::consts::LN_2;
    let e_a = 1.0 + a * (1.0 + a * (0.5 + a * (1.0 / 6.0 + a * (1.0 / 24.0 + a * (1.0 / 120.0 + a / 720.0)))));
    e_a * f32::from_bits(((n + 127) as u32) << 23)
}

/// What a solve needs from a Hessian, computed once for every Linear that reads the same input:
/// the Hessian with dead inputs patched, the column order, and the upper Cholesky factor of
/// the dampened inverse in that order.
pub struct Factored {
    inp: usize,
    /// The Hessian (dead inputs' diagonal set to 1), kept only for `refit_scales`.
    h: Vec<f64>,
    /// Inputs that never fired: their weights are zeroed.
    dead: Vec<usize>,
    /// Processing order of the input columns.
    perm: Vec<usize>,
    /// `U`, in the processing order.
    u: Vec<f32>,
    /// The dampening that made the Hessian factorizable.
    damp: f64,
}

impl Factored {
    /// Prepares the Hessian `h` (full symmetric `inp x inp`, F64) of the input of the Linears
    /// `name` names (it labels warnings and errors).
    pub fn new(name: &str, mut h: Vec<f64>, inp: usize, p: &GptqParams) -> Result<Factored> {
        assert_eq!(h.len(), inp * inp);
        if h.iter().any(|v| !v.is_finite()) {
            return Err(Error::new(format!("module `{name}`: the Hessian contains NaN or infinity")));
        }
        // Inputs that never fire carry no information: the reference zeroes their weights and
        // puts 1 on their diagonal so the factorization goes through.
        let dead: Vec<usize> = (0..inp).filter(|&i| h[i * inp + i] == 0.0).collect();
        for &i in &dead {
            h[i * inp + i] = 1.0;
        }
        let mut perm: Vec<usize> = (0..inp).collect();
        if p.desc_act {
            // Stable, so ties keep their original order.
            perm.sort_by(|&a, &b| h[b * inp + b].total_cmp(&h[a * inp + a]));
        }
        let hp: Vec<f64> = (0..inp * inp).map(|idx| h[perm[idx / inp] * inp + perm[idx % inp]]).collect();
        let h = if p.refit_scales { h } else { Vec::new() };
        let (u, damp) = damped_inverse_factor(name, hp, inp, p)?;
        let u = u.into_iter().map(|v| v as f32).collect();
        Ok(Factored { inp, h, dead, perm, u, damp })
    }

    /// The width of the Hessian: the input features of the Linears it serves.
    pub fn inputs(&self) -> usize {
        self.inp
    }
}

/// Runs GPTQ on `w` (row-major `[out, inp]`) with the Hessian `h` (full symmetric `inp x inp`,
/// F64) from `nsamples` input rows. `name` labels warnings, errors and progress.
pub fn gptq(name: &str, w: &[f32], (out, inp): (usize, usize), h: Vec<f64>, nsamples: u64, p: &GptqParams) -> Result<GptqOutput> {
    let factored = Factored::new(name, h, inp, p)?;
    Ok(solve(name, w, (out, inp), &factored, nsamples, p))
}

/// Runs GPTQ on `w` (row-major `[out, inp]`) with a factored Hessian from `nsamples` input
/// rows (see [`gptq`]); `p` must be the settings `factored` was made with.
pub fn solve(name: &str, w: &[f32], (out, inp): (usize, usize), factored: &Factored, nsamples: u64, p: &GptqParams) -> GptqOutput {
    assert_eq!(w.len(), out * inp);
    assert_eq!(factored.inp, inp);
    let Factored { h, dead, perm, u, damp, .. } = factored;
    let mut w = w.to_vec();
    for &i in dead {
        for o in 0..out {
            w[o * inp + i] = 0.0;
        }
    }
    let gs = if p.group_size <= 0 { inp } else { (p.group_size as usize).min(inp) };
    let groups = inp.div_ceil(gs);
    // Per-row parameters, and groups fixed from the original weights, are found up front.
    let fixed = p.group_size <= 0 || p.static_groups;
    let (fixed_scales, fixed_zeros) = if fixed { fixed_params(&w, out, inp, gs, groups, p) } else { (vec![], vec![]) };

    let block = BLOCK;
    let threads = rayon::current_num_threads().max(1);
    let chunk = (out.div_ceil(2 * threads).div_ceil(16) * 16).clamp(16, 256);
    let total = (out.div_ceil(chunk) * inp.div_ceil(block)) as u64;
    let done = AtomicU64::new(0);
    let reporter = Mutex::new(());
    let report = || {
        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(_guard) = reporter.lock() {
            progress(d, total, name);
        }
    };

    let maxq = ((1u32 << p.bits) - 1) as f32;
    let chunks: Vec<ChunkResult> = (0..out)
        .step_by(chunk)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| {
            let rows = chunk.min(out - r0);
            let mut wc = vec![0f32; inp * rows];
            for r in 0..rows {
                for (j, &c) in perm.iter().enumerate() {
                    wc[j * rows + r] = w[(r0 + r) * inp + c];
                }
            }
            let mut res = ChunkResult {
                codes: vec![0u8; inp * rows],
                scales: vec![0f32; if fixed { 0 } else { groups * rows }],
                zeros: vec![0u8; if fixed { 0 } else { groups * rows }],
                loss: 0.0,
            };
            let mut err = vec![0f32; block * rows];
            let mut at_block_start = vec![0f32; block * rows];
            let (mut scale, mut zero) = (vec![0f32; rows], vec![0f32; rows]);
            let mut vals = vec![0f32; gs];
            for i1 in (0..inp).step_by(block) {
                let i2 = (i1 + block).min(inp);
                // As the reference does, a group starting inside the block takes its parameters
                // from the block's columns as they were when the block began (measured: as good
                // or better than the in-block updated values, notably at 2 bits).
                if !fixed {
                    at_block_start[..(i2 - i1) * rows].copy_from_slice(&wc[i1 * rows..i2 * rows]);
                }
                for i in i1..i2 {
                    if fixed {
                        let g = if p.group_size <= 0 { 0 } else { perm[i] / gs };
                        for r in 0..rows {
                            scale[r] = fixed_scales[g * out + r0 + r];
                            zero[r] = fixed_zeros[g * out + r0 + r] as f32;
                        }
                    } else if i % gs == 0 {
                        let (g, end) = (i / gs, (i + gs).min(inp));
                        for r in 0..rows {
                            let vals = &mut vals[..end - i];
                            for (k, v) in vals.iter_mut().enumerate() {
                                let c = i + k;
                                *v = if c < i2 { at_block_start[(c - i1) * rows + r] } else { wc[c * rows + r] };
                            }
                            let (s, z) = find_params(vals, p);
                            (scale[r], zero[r]) = (s, z as f32);
                            res.scales[g * rows + r] = s;
                            res.zeros[g * rows + r] = z;
                        }
                    }
                    let d = u[i * inp + i];
                    let (col, later) = wc[i * rows..i2 * rows].split_at_mut(rows);
                    let e = &mut err[(i - i1) * rows..(i - i1 + 1) * rows];
                    for r in 0..rows {
                        let q = quant(col[r], scale[r], zero[r], maxq);
                        res.codes[i * rows + r] = q as u8;
                        e[r] = (col[r] - scale[r] * (q - zero[r])) / d;
                        res.loss += (e[r] as f64) * (e[r] as f64) / 2.0;
                    }
                    for (j, dst) in later.chunks_exact_mut(rows).enumerate() {
                        let f = u[i * inp + i + 1 + j];
                        dst.iter_mut().zip(e.iter()).for_each(|(x, e)| *x -= f * e);
                    }
                }
                // Lazy update of every later column: W[i2.., :] -= U[i1..i2, i2..]^T E.
                let lhs = Operand { data: u, offset: i1 * inp + i2, rs: 1, cs: inp };
                let rhs = Operand::rows(&err, 0, rows);
                matmul((inp - i2, rows, i2 - i1), &mut wc, (i2 * rows, rows), lhs, rhs, (1.0, -1.0), true, false);
                report();
            }
            res
        })
        .collect();

    let mut codes = vec![0u8; inp * out];
    let (mut scales, mut zeros) = if fixed { (fixed_scales, fixed_zeros) } else { (vec![0f32; groups * out], vec![0u8; groups * out]) };
    let mut loss = 0f64;
    for (c, res) in chunks.iter().enumerate() {
        let r0 = c * chunk;
        let rows = chunk.min(out - r0);
        for (j, &col) in perm.iter().enumerate() {
            codes[col * out + r0..col * out + r0 + rows].copy_from_slice(&res.codes[j * rows..(j + 1) * rows]);
        }
        if !fixed {
            for g in 0..groups {
                scales[g * out + r0..g * out + r0 + rows].copy_from_slice(&res.scales[g * rows..(g + 1) * rows]);
                zeros[g * out + r0..g * out + r0 + rows].copy_from_slice(&res.zeros[g * rows..(g + 1) * rows]);
            }
        }
        loss += res.loss;
    }
    let mut g_idx = vec![0i32; inp];
    for (j, &col) in perm.iter().enumerate() {
        // Dynamic groups follow the processing order; fixed ones the original column order.
        g_idx[col] = if fixed { (col / gs) as i32 } else { (j / gs) as i32 };
    }
    let mut solved = GptqOutput { codes, scales, zeros, g_idx, loss: loss / nsamples.max(1) as f64, damp_percent: *damp };
    if p.refit_scales {
        refit_scales(&w, h, *damp, (out, inp), &mut solved);
    }
    solved
}

/// Refits the scales of `solved` (codes and zero points fixed) so that each output row's
/// error `(w - q)^T H_d (w - q)` is least, `H_d` being `h` dampened as the solve did. With
/// `c = code - zero` and `B` the `inp x groups` matrix holding `c_j` in column `g_idx[j]`,
/// the scales solve `(B^T H_d B) s = B^T H_d w`. Rows whose system is singular, or whose
/// solution is not positive, keep their scales.
fn refit_scales(w: &[f32], h: &[f64], damp: f64, (out, inp): (usize, usize), solved: &mut GptqOutput) {
    let groups = solved.scales.len() / out;
    let mean = (0..inp).map(|i| h[i * inp + i]).sum::<f64>() / inp as f64;
    let hd: Vec<f32> = (0..inp * inp).map(|k| (h[k] + if k % (inp + 1) == 0 { damp * mean } else { 0.0 }) as f32).collect();
    // c as [inp, out], and H_d c and H_d w^T as [inp, out] (one product each).
    let c: Vec<f32> = (0..inp * out)
        .map(|k| {
            let (j, o) = (k / out, k % out);
            solved.codes[k] as f32 - solved.zeros[solved.g_idx[j] as usize * out + o] as f32
        })
        .collect();
    let members: Vec<Vec<usize>> =
        (0..groups).map(|g| (0..inp).filter(|&j| solved.g_idx[j] as usize == g).collect()).collect();
    let mut hw = vec![0f32; inp * out];
    matmul((inp, out, inp), &mut hw, (0, out), Operand::rows(&hd, 0, inp), Operand::transposed(w, 0, inp), (0.0, 1.0), false, true);
    // a[o][g'][g] = sum over j in g' of c[j][o] (H_d B_g)[j][o]; b[o][g] = sum over j in g of c[j][o] hw[j][o].
    let mut a = vec![0f64; out * groups * groups];
    let mut b = vec![0f64; out * groups];
    let mut hb = vec![0f32; inp * out];
    for (g, cols) in members.iter().enumerate() {
        // H_d B_g = H_d[:, cols] c[cols, :], gathered so the product reads contiguous operands.
        let hd = &hd;
        let hcols: Vec<f32> = (0..inp).flat_map(|i| cols.iter().map(move |&j| hd[i * inp + j])).collect();
        let crows: Vec<f32> = cols.iter().flat_map(|&j| c[j * out..(j + 1) * out].iter().copied()).collect();
        let k = cols.len();
        matmul((inp, out, k), &mut hb, (0, out), Operand::rows(&hcols, 0, k), Operand::rows(&crows, 0, out), (0.0, 1.0), false, true);
        for j in 0..inp {
            let g2 = solved.g_idx[j] as usize;
            for o in 0..out {
                a[(o * groups + g2) * groups + g] += c[j * out + o] as f64 * hb[j * out + o] as f64;
            }
        }
        for &j in cols {
            for o in 0..out {
                b[o * groups + g] += c[j * out + o] as f64 * hw[j * out + o] as f64;
            }
        }
    }
    let new: Vec<Option<Vec<f64>>> = (0..out)
        .into_par_iter()
        .map(|o| {
            let mut m = a[o * groups * groups..(o + 1) * groups * groups].to_vec();
            cholesky_lower(&mut m, groups).ok()?;
            let s = solve_cholesky(&m, groups, &b[o * groups..(o + 1) * groups]);
            s.iter().all(|v| v.is_finite() && *v > 0.0).then_some(s)
        })
        .collect();
    for (o, s) in new.into_iter().enumerate() {
        if let Some(s) = s {
            for (g, v) in s.into_iter().enumerate() {
                solved.scales[g * out + o] = round_scale(v as f32);
            }
        }
    }
}

/// Solves `L L^T x = b` for a lower-triangular `l` (`n x n`).
fn solve_cholesky(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            y[i] -= l[i * n + k] * y[k];
        }
        y[i] /= l[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            y[i] -= l[k * n + i] * y[k];
        }
        y[i] /= l[i * n + i];
    }
    y
}

struct ChunkResult {
    codes: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
    loss: f64,
}

/// Parameters of every group of consecutive original columns (one group per row when
/// `gs == inp`), from the weights as given: `[groups, out]` scales and zeros.
fn fixed_params(w: &[f32], out: usize, inp: usize, gs: usize, groups: usize, p: &GptqParams) -> (Vec<f32>, Vec<u8>) {
    let per_row: Vec<(f32, u8)> = (0..out)
        .into_par_iter()
        .flat_map_iter(|o| w[o * inp..(o + 1) * inp].chunks(gs).map(|g| find_params(g, p)).collect::<Vec<_>>())
        .collect();
    let mut scales = vec![0f32; groups * out];
    let mut zeros = vec![0u8; groups * out];
    for o in 0..out {
        for g in 0..groups {
            (scales[g * out + o], zeros[g * out + o]) = per_row[o * groups + g];
        }
    }
    (scales, zeros)
}

/// Dampens `h` and factors its inverse, raising the dampening step by step (with a warning
/// naming the module) while `h` is not positive definite. Returns `U` and the dampening used.
fn damped_inverse_factor(name: &str, h: Vec<f64>, n: usize, p: &GptqParams) -> Result<(Vec<f64>, f64)> {
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut damp = p.damp_percent;
    loop {
        match inverse_cholesky_upper(&h, n, damp * mean) {
            Ok(u) => return Ok((u, damp)),
            Err(col) => {
                let next = damp + p.damp_auto_increment;
                if p.damp_auto_increment <= 0.0 || next >= 1.0 {
                    return Err(Error::new(format!(
                        "module `{name}`: the Hessian is not positive definite (column {col}) even with \
                         damp_percent {damp:.4}; give more calibration data or raise damp_percent"
                    )));
                }
                log::warn!(
                    "module `{name}`: Hessian not positive definite (column {col}) with damp_percent {damp:.4}, \
                     raising it to {next:.4}"
                );
                damp = next;
            }
        }
    }
}
