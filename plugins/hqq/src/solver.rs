//! The half-quadratic solver of HQQ (Badri & Shaji 2023) for one group of weights, with the
//! hqq library's initialisation and defaults (`hqq/core/quantize.py`, `hqq/core/optimize.py`).
//!
//! hqq works with the *inverse* scale `s`: codes are `q = clamp(round(w * s + z), 0, 2^nbits - 1)`
//! and the dequantized weight is `(q - z) / s`. The start is min-max (`s = maxq / (max - min)`,
//! `z = -min * s`, `z` rounded when `round_zero`); then, with the scale fixed (hqq optimises only
//! the zero point), each iteration
//! 1. quantizes with the current zero and takes the error `e = w - (q - z) / s`;
//! 2. shrinks it under the lp norm (p < 1): `e' = sign(e) * max(|e| - |e|^(p-1) / beta, 0)`;
//! 3. sets the zero to the mean of `q - (w - e') * s`;
//! 4. multiplies beta by kappa;
//!
//! and stops when the error stops falling.
//!
//! Where kvant differs from hqq 0.2.8, and why:
//! - hqq's default solver (`optimize_weights_proximal_legacy`) never applies kappa: beta stays at
//!   its start value. kvant applies it, as the paper and hqq's own `kappa` parameter say;
//!   `kappa = 1` reproduces hqq's schedule.
//! - hqq stops *all* groups of a tensor when the tensor's mean absolute error stops falling,
//!   and then returns the zero computed one step after the worsening one (never evaluated).
//!   kvant runs each group on its own (groups do not interact, so this parallelises), stops a
//!   group when its own *squared* error stops falling, and keeps the best zero it evaluated.
//!   Squared error because, wherever the shrinkage is zero (errors below
//!   `beta^(-1/(2-p))`, about 0.17 with the defaults: nearly all of them for LLM weights), step 3
//!   is the least-squares zero for the current codes and re-quantizing is the least-squares
//!   code for that zero, so the squared error falls monotonically to a fixed point; a group-wise
//!   stop on the absolute error fires early on that path (measured: up to 2% higher error than
//!   hqq at 2 bits), while this one reaches hqq's result (the fixture tests).
//! - kvant then keeps, per group, whichever of that zero and the plain min-max start has the
//!   lower squared error, so it is never worse than min-max round-to-nearest at the same bits
//!   and group. hqq returns the optimised zero unconditionally.
//!
//! Why the reference degrades at 3 bits: see the crate documentation.

/// The solver's settings, with hqq's defaults in [`SolverParams::default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SolverParams {
    /// Bits per code (1..=8).
    pub nbits: u32,
    /// Round the initial zero point to an integer (hqq does it at 4 bits by default).
    pub round_zero: bool,
    /// Run the solver at all; `false` is plain min-max.
    pub optimize: bool,
    /// The p of the lp norm, in (0, 1].
    pub lp_norm: f32,
    /// Initial beta of the half-quadratic splitting.
    pub beta: f32,
    /// Beta grows by this factor every iteration (1: constant, as hqq 0.2.8's default solver).
    pub kappa: f32,
    /// Most iterations.
    pub iters: u32,
    /// Stop a group when its squared error stops falling.
    pub early_stop: bool,
    /// Keep zero points integers (round the start and every update), so that code `zero`
    /// dequantizes to exactly 0 (kvant's addition; see the crate documentation).
    pub integer_zero: bool,
    /// For storage formats with integer zero points (the GPTQ export): with `integer_zero`,
    /// zeros stay within `[min_zero, 2^nbits - 1]` and the scale (`1 / inv_scale`) is one F16
    /// holds, so that the error the solver minimises is the stored one.
    pub stored: Option<StoredAs>,
}

/// What an integer-zero storage format can hold (see [`SolverParams::stored`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoredAs {
    /// The lowest zero point: 1 for GPTQ's v1 layout, which stores `zero - 1` unsigned.
    pub min_zero: f32,
}

impl Default for SolverParams {
    fn default() -> Self {
        SolverParams {
            nbits: 4,
            round_zero: true,
            optimize: true,
            lp_norm: 0.7,
            beta: 10.0,
            kappa: 1.01,
            iters: 20,
            early_stop: true,
            integer_zero: false,
            stored: None,
        }
    }
}

/// The parameters chosen for one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupFit {
    /// Inverse scale: `q = round(w * inv_scale + zero)`. hqq stores `1 / inv_scale` as `scale`.
    pub inv_scale: f32,
    /// Zero point, in code units (not rounded unless `round_zero` and no optimisation).
    pub zero: f32,
    /// Squared reconstruction error of the group with these parameters.
    pub sq_error: f64,
    /// True when the optimised zero was kept, false when min-max was better.
    pub optimized: bool,
}

/// Lanes of the inner loops: plain arrays of this width compile to SIMD registers.
const LANES: usize = 8;

/// `round half to even` for |x| < 2^22 (the callers clamp first): adding and subtracting
/// 1.5 * 2^23 leaves the rounded value, like `torch.round`, and vectorises everywhere.
#[inline(always)]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// `a.max(b)` without NaN handling (none can occur here), which compiles to one instruction.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `a.min(b)` without NaN handling.
#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// The code of `w`: `clamp(round(w * s + z), 0, maxq)`. Clamping to `[-1, maxq + 1]` before
/// rounding gives the same result and keeps the magic rounding in range.
#[inline(always)]
fn code(w: f32, s: f32, z: f32, maxq: f32) -> f32 {
    min(max(round_even(min(max(w * s + z, -1.0), maxq + 1.0)), 0.0), maxq)
}

/// Sums over one group for zero `z`: squared error, `sum(q - w*s)`, and max |e|.
#[inline(always)]
fn evaluate(w: &[f32], s: f32, z: f32, maxq: f32) -> (f32, f32, f32) {
    let inv = 1.0 / s;
    let (mut l2, mut acc, mut big) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let chunks = w.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let q = code(c[j], s, z, maxq);
            let e = c[j] - (q - z) * inv;
            l2[j] += e * e;
            acc[j] += q - c[j] * s;
            big[j] = max(big[j], e.abs());
        }
    }
    for (j, &x) in tail.iter().enumerate() {
        let q = code(x, s, z, maxq);
        let e = x - (q - z) * inv;
        l2[j] += e * e;
        acc[j] += q - x * s;
        big[j] = max(big[j], e.abs());
    }
    let sum = |a: [f32; LANES]| a.iter().sum::<f32>();
    (sum(l2), sum(acc), big.iter().fold(0f32, |m, &b| m.max(b)))
}

/// `sum(shrink(e))` over the group, for the (rare) errors the shrinkage does not zero.
fn shrunk_sum(w: &[f32], s: f32, z: f32, maxq: f32, beta: f32, p: f32, threshold: f32) -> f32 {
    let inv = 1.0 / s;
    let mut sum = 0f32;
    for &x in w {
        let e = x - (code(x, s, z, maxq) - z) * inv;
        let a = e.abs();
        if a > threshold {
            sum += (a - a.powf(p - 1.0) / beta).max(0.0).copysign(e);
        }
    }
    sum
}

/// hqq's min-max start: inverse scale and zero of a group. With `with_zero` the range is
/// widened to include 0 (as round-to-nearest does), so that an integer zero point is a code.
pub fn min_max(w: &[f32], nbits: u32, round_zero: bool, with_zero: bool) -> (f32, f32) {
    let maxq = ((1u32 << nbits) - 1) as f32;
    let start = if with_zero { (0.0, 0.0) } else { (f32::INFINITY, f32::NEG_INFINITY) };
    let (lo, hi) = w.iter().fold(start, |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let denom = hi - lo;
    // hqq's guards: a (near) constant group gets scale 1; the inverse scale is capped for f16.
    let s = if denom.abs() <= 1e-4 { 1.0 } else { maxq / denom }.min(2e4);
    let z = -lo * s;
    (s, if round_zero { z.round_ties_even() } else { z })
}

/// The start for an integer-zero storage format: round-to-nearest's parameters (range widened
/// to include 0, scale rounded to F16 as stored, zero rounded), the zero kept within
/// `[min_zero, maxq]`.
pub fn stored_start(w: &[f32], nbits: u32, stored: StoredAs) -> (f32, f32) {
    let maxq = ((1u32 << nbits) - 1) as f32;
    let (lo, hi) = w.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let denom = hi - lo;
    // hqq's guards as in `min_max`: scale 1 for a (near) constant group, inverse scale <= 2e4.
    let scale = if denom.abs() <= 1e-4 { 1.0 } else { (denom / maxq).max(1.0 / 2e4) };
    let s = 1.0 / f16_round(scale);
    (s, (-lo * s).round_ties_even().clamp(stored.min_zero, maxq))
}

/// `x` rounded to the nearest F16 value, as an f32.
fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Fits one group and writes its codes into `codes` (same length as `w`).
pub fn fit_group(w: &[f32], p: &SolverParams, codes: &mut [u8]) -> GroupFit {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { fit_group_avx2(w, p, codes) };
    }
    fit(w, p, codes)
}

/// [`fit`] compiled for AVX2: the lane loops then run 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fit_group_avx2(w: &[f32], p: &SolverParams, codes: &mut [u8]) -> GroupFit {
    fit(w, p, codes)
}

#[inline(always)]
fn fit(w: &[f32], p: &SolverParams, codes: &mut [u8]) -> GroupFit {
    let maxq = ((1u32 << p.nbits) - 1) as f32;
    let stored = p.stored.filter(|_| p.integer_zero);
    let (s, z0) = match stored {
        Some(st) => stored_start(w, p.nbits, st),
        None => min_max(w, p.nbits, p.round_zero || p.integer_zero, p.integer_zero),
    };
    // An integer zero moves within the codes the format can store.
    let zero_range = stored.map_or((f32::NEG_INFINITY, f32::INFINITY), |st| (st.min_zero, maxq));
    let (l2_0, mut acc, mut big) = evaluate(w, s, z0, maxq);
    let mut best = GroupFit { inv_scale: s, zero: z0, sq_error: l2_0 as f64, optimized: false };
    if p.optimize && !w.is_empty() {
        let n = w.len() as f32;
        let (mut z, mut beta) = (z0, p.beta);
        let (mut opt_zero, mut opt_l2) = (z0, l2_0);
        for _ in 0..p.iters {
            // |e| - |e|^(p-1) / beta > 0 exactly when |e| > beta^(-1 / (2 - p)): errors below
            // that (nearly all, for weights of LLM magnitude) shrink to zero.
            let threshold = beta.powf(-1.0 / (2.0 - p.lp_norm));
            let mut shift = 0.0;
            if big > threshold {
                shift = shrunk_sum(w, s, z, maxq, beta, p.lp_norm, threshold) * s;
            }
            z = (acc + shift) / n;
            if p.integer_zero {
                z = z.round_ties_even().clamp(zero_range.0, zero_range.1);
            }
            beta *= p.kappa;
            let (l2, a, b) = evaluate(w, s, z, maxq);
            (acc, big) = (a, b);
            if l2 < opt_l2 {
                (opt_zero, opt_l2) = (z, l2);
            } else if p.early_stop {
                break;
            }
        }
        if opt_l2 < l2_0 {
            best = GroupFit { inv_scale: s, zero: opt_zero, sq_error: opt_l2 as f64, optimized: true };
        }
    }
    for (c, &x) in codes.iter_mut().zip(w) {
        *c = code(x, best.inv_scale, best.zero, maxq) as u8;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        };
        (0..n)
            .map(|_| {
                let (a, b) = (uniform(), uniform());
                0.02 * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
            })
            .collect()
    }

    fn sq_error(w: &[f32], codes: &[u8], f: &GroupFit) -> f64 {
        w.iter().zip(codes).map(|(&x, &q)| ((x - (q as f32 - f.zero) / f.inv_scale) as f64).powi(2)).sum()
    }

    #[test]
    fn rounding_is_half_to_even_like_torch() {
        for (x, want) in [(0.5, 0.0), (1.5, 2.0), (2.5, 2.0), (-0.5, 0.0), (3.49, 3.0), (6.5, 6.0)] {
            assert_eq!(round_even(x), want, "{x}");
        }
        assert_eq!(code(100.0, 1.0, 0.0, 7.0), 7.0);
        assert_eq!(code(-3.0, 1.0, 0.0, 7.0), 0.0);
    }

    #[test]
    fn min_max_matches_hqq_start() {
        let (s, z) = min_max(&[-1.0, 0.0, 2.0], 4, false, false);
        assert_eq!((s, z), (5.0, 5.0));
        // Constant group: scale 1, zero -min.
        assert_eq!(min_max(&[0.5, 0.5], 4, true, false), (1.0, 0.0));
        // Widened to include 0: [0, 3] at 2 bits.
        assert_eq!(min_max(&[1.0, 3.0], 2, true, true), (1.0, 0.0));
    }

    #[test]
    fn never_worse_than_min_max_and_usually_better() {
        for nbits in [1, 2, 3, 4, 8] {
            let (mut better, mut total) = (0, 0);
            for g in 0..200 {
                let w = gaussian(64, g);
                let mut codes = vec![0u8; 64];
                let p = SolverParams { nbits, round_zero: false, ..Default::default() };
                let fit = fit_group(&w, &p, &mut codes);
                let (s, z) = min_max(&w, nbits, false, false);
                let mut mm_codes = vec![0u8; 64];
                let mm = fit_group(&w, &SolverParams { optimize: false, ..p }, &mut mm_codes);
                assert_eq!((mm.inv_scale, mm.zero), (s, z));
                let (e, e_mm) = (sq_error(&w, &codes, &fit), sq_error(&w, &mm_codes, &mm));
                // The solver compares f32 sums; allow for their rounding.
                assert!(e <= e_mm * (1.0 + 1e-5), "{nbits} bits, group {g}: {e} > {e_mm}");
                assert!((fit.sq_error - e).abs() <= 1e-3 * e.max(1e-12), "reported error {} vs {e}", fit.sq_error);
                better += (e < e_mm) as usize;
                total += 1;
            }
            assert!(nbits == 8 || better * 4 > total, "{nbits} bits: optimised only {better}/{total}");
        }
    }

    #[test]
    fn stored_start_is_round_to_nearest_with_zeros_from_min_zero() {
        let st = StoredAs { min_zero: 1.0 };
        // [-1, 2] at 4 bits: scale 3/15 = 0.2 rounded to F16, zero round(1 / 0.2) = 5.
        let (s, z) = stored_start(&[-1.0, 0.5, 2.0], 4, st);
        assert_eq!(f16_round(1.0 / s), f16_round(0.2));
        assert!((1.0 / s - f16_round(0.2)).abs() < 1e-7 && z == 5.0, "{s} {z}");
        // Non-negative weights would take zero 0; GPTQ's v1 layout starts at 1.
        assert_eq!(stored_start(&[0.1, 0.5], 4, st).1, 1.0);
        // The range includes 0: [1, 3] at 2 bits is fitted as [0, 3], step 1.
        assert_eq!(stored_start(&[1.0, 3.0], 2, st), (1.0, 1.0));
    }

    #[test]
    fn stored_fit_is_never_worse_than_its_start_and_keeps_its_zeros_storable() {
        for nbits in [2, 3, 4, 8] {
            for g in 0..100 {
                let mut w = gaussian(64, 1000 + g);
                if g % 10 == 0 {
                    w.iter_mut().for_each(|v| *v = v.abs());
                }
                let p = SolverParams { nbits, integer_zero: true, stored: Some(StoredAs { min_zero: 1.0 }), ..Default::default() };
                let (mut codes, mut rtn_codes) = (vec![0u8; 64], vec![0u8; 64]);
                let fit = fit_group(&w, &p, &mut codes);
                let rtn = fit_group(&w, &SolverParams { optimize: false, ..p }, &mut rtn_codes);
                assert_eq!((rtn.inv_scale, rtn.zero), stored_start(&w, nbits, StoredAs { min_zero: 1.0 }));
                assert!(fit.zero.fract() == 0.0 && fit.zero >= 1.0 && fit.zero <= ((1 << nbits) - 1) as f32, "zero {}", fit.zero);
                assert!(sq_error(&w, &codes, &fit) <= sq_error(&w, &rtn_codes, &rtn) * (1.0 + 1e-5), "{nbits} bits, group {g}");
            }
        }
    }

    #[test]
    fn large_errors_go_through_the_shrinkage() {
        // Weights of magnitude ~100 make errors exceed the threshold; the result stays sane.
        let w: Vec<f32> = gaussian(64, 9).iter().map(|v| v * 5000.0).collect();
        let mut codes = vec![0u8; 64];
        let fit = fit_group(&w, &SolverParams { nbits: 3, round_zero: false, ..Default::default() }, &mut codes);
        assert!(fit.zero.is_finite() && fit.sq_error.is_finite());
    }
}
