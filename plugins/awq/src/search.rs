//! AWQ's searches on a compact form of the calibration inputs.
//!
//! The reference (AutoAWQ) scores every candidate by re-running the module on every
//! calibration token. For a group of Linears the output error is a quadratic form in the
//! weight error `D`: `sum_t ||D x_t||^2 = sum_rows d G d^T` with `G = sum_t x_t x_t^T`. The
//! observer keeps the per-channel mean |x| over every row and a bounded, evenly spaced sample
//! of rows; `G` is built once from the sample, and each candidate then costs one
//! `[out, in] x [in, in]` product instead of a pass over all tokens.

use half::f16;
use kvant_plugin_api::{Error, Observer, Result};
use rayon::prelude::*;

/// Per-input-channel mean |x| over every observed row, and an evenly spaced sample of rows.
pub struct AwqObserver {
    name: String,
    inp: usize,
    max_rows: usize,
    rows: u64,
    abs_sum: Vec<f64>,
    /// Rows whose index is a multiple of `stride`, row-major.
    sample: Vec<f32>,
    stride: u64,
}

impl AwqObserver {
    /// An observer for inputs of width `inp` keeping at most `max_rows` sampled rows.
    pub fn new(name: String, inp: usize, max_rows: usize) -> Self {
        AwqObserver { name, inp, max_rows: max_rows.max(1), rows: 0, abs_sum: vec![0.0; inp], sample: Vec::new(), stride: 1 }
    }

    /// Rows observed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Mean |x| per input channel.
    pub fn mean_abs(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.abs_sum.iter().map(|s| (s / n) as f32).collect()
    }

    /// `G = S^T S / rows(S)` over the sampled rows `S`: `[inp, inp]`, row-major.
    pub fn gram(&self) -> Vec<f32> {
        let n = self.sample.len() / self.inp;
        let mut g = vec![0f32; self.inp * self.inp];
        if n == 0 {
            return g;
        }
        // G = S^T S: S^T read through strides, no transposed copy.
        unsafe {
            // SAFETY: S is [n, inp] row-major; G is [inp, inp]; the strides stay inside both.
            gemm::gemm(
                self.inp, self.inp, n,
                g.as_mut_ptr(), 1, self.inp as isize,
                false,
                self.sample.as_ptr(), self.inp as isize, 1,
                self.sample.as_ptr(), 1, self.inp as isize,
                0.0f32, 1.0 / n as f32,
                false, false, false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        g
    }
}

impl Observer for AwqObserver {
    fn observe(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let inp = self.inp;
        if x.len() != rows * inp {
            return Err(Error::new(format!("`{}`: {} values are not {rows} rows of {inp}", self.name, x.len())));
        }
        // Chunked f32 sums, added up in f64: precise and parallel.
        let sums = x
            .par_chunks(inp * 256)
            .map(|chunk| {
                let mut s = vec![0f32; inp];
                for row in chunk.chunks_exact(inp) {
                    for (a, v) in s.iter_mut().zip(row) {
                        *a += v.abs();
                    }
                }
                s
            })
            .reduce(|| vec![0f32; inp], |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            });
        self.abs_sum.iter_mut().zip(&sums).for_each(|(a, s)| *a += *s as f64);
        for (r, row) in x.chunks_exact(inp).enumerate() {
            let t = self.rows + r as u64;
            if t % self.stride != 0 {
                continue;
            }
            if self.sample.len() / inp == self.max_rows {
                // Full: keep every other sampled row and sample half as often from now on.
                let kept: Vec<f32> = self.sample.chunks_exact(inp).step_by(2).flatten().copied().collect();
                self.sample = kept;
                self.stride *= 2;
                if t % self.stride != 0 {
                    continue;
                }
            }
            self.sample.extend_from_slice(row);
        }
        self.rows += rows as u64;
        Ok(())
    }
}

/// How the codes of one group are derived.
#[derive(Clone, Copy, Debug)]
pub struct QuantParams {
    /// Input columns per scale.
    pub group_size: usize,
    /// Asymmetric (min-max with a zero point) or symmetric (zero fixed at 8).
    pub zero_point: bool,
}

impl QuantParams {
    /// The column ranges of the groups of a row of `inp` values; the last one may be short.
    pub fn groups(&self, inp: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let g = self.group_size;
        (0..inp.div_ceil(g)).map(move |k| k * g..((k + 1) * g).min(inp))
    }

    /// Scale and zero of one group (AutoAWQ's `pseudo_quantize_tensor`), the scale rounded to
    /// F16 when `f16_scale`, as it is stored.
    pub fn scale_zero(&self, w: &[f32], f16_scale: bool) -> (f32, f32) {
        let round = |s: f32| if f16_scale { f16::from_f32(s).to_f32() } else { s };
        if self.zero_point {
            let (lo, hi) = w.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let s = round((hi - lo).max(1e-5) / 15.0);
            let z = (-round_even(lo / s)).clamp(0.0, 15.0);
            (s, z)
        } else {
            let m = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            (round(m.max(1e-5) / 7.0), 8.0)
        }
    }

    /// The code of `v` under `(s, z)`.
    pub fn code(s: f32, z: f32, v: f32) -> f32 {
        (round_even(v / s) + z).clamp(0.0, 15.0)
    }

    /// Replaces each group of `row` by its quantized-then-dequantized values.
    pub fn fake_quantize_row(&self, row: &mut [f32]) {
        for r in self.groups(row.len()) {
            let g = &mut row[r];
            let (s, z) = self.scale_zero(g, false);
            for v in g.iter_mut() {
                *v = (Self::code(s, z, *v) - z) * s;
            }
        }
    }
}

/// Rounds half to even like `f32::round_ties_even`, without the library call that the
/// baseline x86-64 target makes of it: adding and removing 1.5 * 2^23 leaves the FPU's rounding.
/// Exact for |x| < 2^22; beyond, the result is off by at most 1, where codes saturate anyway.
#[inline]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if x.abs() >= 4_194_304.0 {
        return x;
    }
    (x + MAGIC) - MAGIC
}

/// `a b` for row-major `a` `[m, k]` and `b` `[k, n]`, on the gemm crate's run-time-dispatched kernels.
fn matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return y;
    }
    assert!(a.len() == m * k && b.len() == k * n);
    unsafe {
        // SAFETY: the assert bounds every index of a, b and y under these strides.
        gemm::gemm(
            m, n, k,
            y.as_mut_ptr(), 1, n as isize,
            false,
            a.as_ptr(), 1, k as isize,
            b.as_ptr(), 1, n as isize,
            0.0f32, 1.0f32,
            false, false, false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    y
}

/// `sum_k a_k b_k` per pair of rows of `a` and `b` (`[rows, n]` each), in f64.
fn row_dots(a: &[f32], b: &[f32], n: usize) -> Vec<f64> {
    a.par_chunks(n)
        .zip(b.par_chunks(n))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum())
        .collect()
}

/// `sum_i d_i (G d_i^T)` over the rows `d_i` of `d` (`[rows, inp]`): the summed squared output
/// error, per row, of a weight error `d` on inputs with Gram matrix `g`.
pub fn quadratic_losses(d: &[f32], g: &[f32], inp: usize) -> Vec<f64> {
    // G is symmetric, so D G serves for D G^T.
    let dg = matmul(d, d.len() / inp, inp, g, inp);
    row_dots(d, &dg, inp)
}

/// The AWQ scale candidate for ratio `alpha` (AutoAWQ's `_search_best_scale` grid point):
/// `mean|x|^alpha`, divided by `w_mean^(1-alpha)` with `duo` (`w_mean` given), floored at 1e-4,
/// then normalised so that `max * min = 1`.
pub fn candidate(x_mean: &[f32], w_mean: Option<&[f32]>, alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = match w_mean {
        Some(w) => x_mean.iter().zip(w).map(|(x, w)| (x.powf(alpha) / (w.powf(1.0 - alpha) + 1e-4)).max(1e-4)).collect(),
        None => x_mean.iter().map(|x| x.powf(alpha).max(1e-4)).collect(),
    };
    let (lo, hi) = s.iter().fold((f32::INFINITY, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (hi * lo).sqrt();
    for v in &mut s {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// Per input column, the mean over rows of |w| relative to the largest |w| of its group
/// (AutoAWQ's `w_mean` for duo scaling), over all rows of `w` (`[rows, inp]`).
pub fn weight_mean(w: &[f32], inp: usize, p: &QuantParams) -> Vec<f32> {
    let rows = w.len() / inp;
    let sums = w
        .par_chunks(inp * 64)
        .map(|chunk| {
            let mut s = vec![0f64; inp];
            for row in chunk.chunks_exact(inp) {
                for r in p.groups(inp) {
                    let m = row[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-6;
                    for k in r {
                        s[k] += (row[k].abs() / m) as f64;
                    }
                }
            }
            s
        })
        .reduce(|| vec![0f64; inp], |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        });
    sums.iter().map(|s| (s / rows.max(1) as f64) as f32).collect()
}

/// Result of the scale search on a group of Linears.
pub struct ScaleSearch {
    /// The best input scale.
    pub scale: Vec<f32>,
    /// Its loss per member (summed squared output error per token).
    pub losses: Vec<f64>,
}

/// Searches `n_grid` ratios for the input scale minimising the members' summed output error
/// after fake quantization of `W diag(s)` and unscaling. `weights[i]` is member `i`'s
/// `[out_i, inp]` weight.
pub fn search_scale(weights: &[&[f32]], x_mean: &[f32], g: &[f32], n_grid: usize, duo: bool, p: &QuantParams) -> ScaleSearch {
    let inp = x_mean.len();
    let all: Vec<f32> = weights.iter().flat_map(|w| w.iter().copied()).collect();
    let w_mean = duo.then(|| weight_mean(&all, inp, p));
    let mut best: Option<(f64, ScaleSearch)> = None;
    for k in 0..n_grid {
        let s = candidate(x_mean, w_mean.as_deref(), k as f32 / n_grid as f32);
        let mut d = all.clone();
        d.par_chunks_mut(inp).for_each(|row| {
            row.iter_mut().zip(&s).for_each(|(v, s)| *v *= s);
            p.fake_quantize_row(row);
        });
        d.par_chunks_mut(inp).zip(all.par_chunks(inp)).for_each(|(row, w)| {
            for ((v, s), w) in row.iter_mut().zip(&s).zip(w) {
                *v = *v / s - w;
            }
        });
        let per_row = quadratic_losses(&d, g, inp);
        let mut losses = Vec::with_capacity(weights.len());
        let mut at = 0;
        for w in weights {
            let rows = w.len() / inp;
            losses.push(per_row[at..at + rows].iter().sum::<f64>());
            at += rows;
        }
        let total: f64 = losses.iter().sum();
        if best.as_ref().map_or(true, |(b, _)| total < *b) {
            best = Some((total, ScaleSearch { scale: s, losses }));
        }
    }
    best.expect("n_grid is at least 1").1
}

/// AutoAWQ's clipping search (`_compute_best_clip`) for one `[out, inp]` weight: per row and
/// group, the largest |w| kept among `1 - i/n_grid` (`i < max_shrink * n_grid`) of the original,
/// scored by the group's output error `d G_gg d^T`. Clamps `w` in place to the best.
pub fn clip(w: &mut [f32], g: &[f32], inp: usize, n_grid: usize, max_shrink: f64, p: &QuantParams) {
    let steps = (max_shrink * n_grid as f64) as usize;
    if steps <= 1 {
        return;
    }
    for r in p.groups(inp) {
        let n = r.len();
        let block: Vec<f32> = r.clone().flat_map(|a| g[a * inp + r.start..a * inp + r.end].iter().copied()).collect();
        // Every row's weight error at every shrink step, then all their losses in one product.
        let mut d = vec![0f32; w.len() / inp * steps * n];
        d.par_chunks_mut(steps * n).zip(w.par_chunks(inp)).for_each(|(d, row)| {
            let orig = &row[r.clone()];
            let max0 = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, t) in d.chunks_mut(n).enumerate() {
                let mv = max0 * (1.0 - i as f32 / n_grid as f32);
                t.iter_mut().zip(orig).for_each(|(t, v)| *t = v.clamp(-mv, mv));
                let (s, z) = p.scale_zero(t, false);
                t.iter_mut().zip(orig).for_each(|(t, v)| *t = (QuantParams::code(s, z, *t) - z) * s - v);
            }
        });
        let dg = matmul(&d, d.len() / n, n, &block, n);
        let errs = row_dots(&d, &dg, n);
        w.par_chunks_mut(inp).zip(errs.par_chunks(steps)).for_each(|(row, errs)| {
            let best = (0..steps).fold(0, |b, i| if errs[i] < errs[b] { i } else { b });
            let max0 = row[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
            let mv = max0 * (1.0 - best as f32 / n_grid as f32);
            row[r.clone()].iter_mut().for_each(|v| *v = v.clamp(-mv, mv));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn sampling_stays_bounded_and_even() {
        let inp = 3;
        let mut o = AwqObserver::new("t".into(), inp, 4);
        let x: Vec<f32> = (0..20 * inp).map(|k| (k / inp) as f32).collect();
        o.observe(&x, 20).unwrap();
        let kept: Vec<f32> = o.sample.chunks(inp).map(|r| r[0]).collect();
        assert_eq!(kept, [0.0, 8.0, 16.0]);
        assert_eq!(o.rows(), 20);
        assert!((o.mean_abs()[0] - 9.5).abs() < 1e-6);
    }

    #[test]
    fn quadratic_loss_equals_the_output_error() {
        let (rows, inp, out) = (50, 12, 5);
        let x = values(rows * inp, 1);
        let d = values(out * inp, 2);
        let mut o = AwqObserver::new("t".into(), inp, 1000);
        o.observe(&x, rows).unwrap();
        let g = o.gram();
        let got: f64 = quadratic_losses(&d, &g, inp).iter().sum();
        let mut want = 0f64;
        for t in 0..rows {
            for r in 0..out {
                let y: f64 = (0..inp).map(|k| x[t * inp + k] as f64 * d[r * inp + k] as f64).sum();
                want += y * y;
            }
        }
        want /= rows as f64;
        assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
    }

    #[test]
    fn round_even_matches_the_library() {
        for x in [-2.5f32, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -3.51, 7.5, 1e7, -1e7, 0.0] {
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn clipping_lowers_the_loss_around_an_outlier_weight() {
        let (rows, inp, out) = (300, 16, 8);
        let x = values(rows * inp, 6);
        let mut w = values(out * inp, 7);
        w[5] = 3.0;
        let mut o = AwqObserver::new("t".into(), inp, 1000);
        o.observe(&x, rows).unwrap();
        let g = o.gram();
        let p = QuantParams { group_size: 8, zero_point: true };
        let loss = |w: &[f32], orig: &[f32]| {
            let mut q = w.to_vec();
            q.chunks_mut(inp).for_each(|r| p.fake_quantize_row(r));
            let d: Vec<f32> = q.iter().zip(orig).map(|(a, b)| a - b).collect();
            quadratic_losses(&d, &g, inp).iter().sum::<f64>()
        };
        let orig = w.clone();
        let before = loss(&w, &orig);
        clip(&mut w, &g, inp, 20, 0.5, &p);
        assert!(loss(&w, &orig) <= before + 1e-9);
    }

    #[test]
    fn candidates_are_normalised() {
        let x = [0.5f32, 2.0, 8.0];
        let s = candidate(&x, None, 0.5);
        let (lo, hi) = (s.iter().cloned().fold(f32::MAX, f32::min), s.iter().cloned().fold(0f32, f32::max));
        assert!((lo * hi - 1.0).abs() < 1e-5);
        assert!(candidate(&x, None, 0.0).iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn short_last_group_is_its_own_group() {
        let p = QuantParams { group_size: 4, zero_point: true };
        let r: Vec<_> = p.groups(10).collect();
        assert_eq!(r, [0..4, 4..8, 8..10]);
        let mut row = values(10, 3);
        let orig = row.clone();
        p.fake_quantize_row(&mut row);
        // The last two values form a group of their own: min and max are exact.
        let (lo, hi) = (orig[8].min(orig[9]), orig[8].max(orig[9]));
        assert!((row[8].min(row[9]) - lo).abs() < (hi - lo) / 15.0 + 1e-6);
    }

    #[test]
    fn search_beats_or_matches_no_scaling_on_outlier_channels() {
        let (rows, inp, out) = (400, 32, 16);
        let mut x = values(rows * inp, 4);
        for t in 0..rows {
            x[t * inp + 3] *= 40.0;
        }
        let w = values(out * inp, 5);
        let mut o = AwqObserver::new("t".into(), inp, 1000);
        o.observe(&x, rows).unwrap();
        let g = o.gram();
        let p = QuantParams { group_size: 16, zero_point: true };
        let found = search_scale(&[&w], &o.mean_abs(), &g, 20, false, &p);
        let plain = search_scale(&[&w], &o.mean_abs(), &g, 1, false, &p);
        assert!(found.losses[0] < plain.losses[0], "{} vs {}", found.losses[0], plain.losses[0]);
        assert!(found.scale[3] > 1.0);
    }
}
