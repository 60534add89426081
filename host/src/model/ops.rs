//! Element-wise and row-wise kernels of the decoder: RMSNorm, rotary embeddings, causal
//! grouped-query attention, SiLU gating, and the exponentials they need.
//!
//! The hot loops are plain Rust written so that LLVM vectorizes them, compiled once more for
//! AVX2+FMA and AVX-512 and picked at run time (the crate builds for baseline x86-64).

use rayon::prelude::*;

use super::linear::{matmul_strided, MatRef};

/// Defines `fn $name` whose body is compiled for baseline, AVX2+FMA and AVX-512, choosing the
/// best one the CPU supports at each call (the feature check is a cached load).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU has the features v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Lanes of the explicit accumulators, so that reductions vectorize (a single f32 accumulator
/// would force the sequential order).
const LANES: usize = 16;

/// `e^x` to about 2 ulp for x in [-87, 88], branch-free so that loops over it vectorize.
/// Below -87 it returns about 1e-38 (which sums treat as zero), above 88 it saturates.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the remainder, for an accurate reduction.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r for |r| <= ln2/2: Taylor to degree 7, error below 1e-8 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let e = (t.to_bits() as i32 - SHIFTER.to_bits() as i32 + 127) << 23;
    p * f32::from_bits(e as u32)
}

multiversion! {
    /// The largest value of `xs` (negative infinity when empty).
    pub(crate) fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in acc.iter().chain(tail) {
            m = if v > m { v } else { m };
        }
        m
    }
}

multiversion! {
    /// `sum(exp(x - shift))` accumulated in f64.
    pub(crate) fn sum_exp(xs: &[f32], shift: f32) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp(c[i] - shift) as f64;
            }
        }
        acc.iter().sum::<f64>() + tail.iter().map(|&v| exp(v - shift) as f64).sum::<f64>()
    }
}

multiversion! {
    /// `sum(exp(r - shift) * (r - m))` over paired values, accumulated in f64: the unnormalized
    /// `E_p[r - m]` that a KL divergence between two logit rows needs.
    pub(crate) fn sum_exp_times_diff(r: &[f32], m: &[f32], shift: f32) -> f64 {
        assert_eq!(r.len(), m.len());
        let mut acc = [0f64; LANES];
        let rc = r.chunks_exact(LANES);
        let mc = m.chunks_exact(LANES);
        let (rt, mt) = (rc.remainder(), mc.remainder());
        for (a, b) in rc.zip(mc) {
            for i in 0..LANES {
                acc[i] += (exp(a[i] - shift) * (a[i] - b[i])) as f64;
            }
        }
        acc.iter().sum::<f64>() + rt.iter().zip(mt).map(|(&a, &b)| (exp(a - shift) * (a - b)) as f64).sum::<f64>()
    }
}

multiversion! {
    /// Softmax of one row in place, in f32 (rows of attention scores).
    fn softmax_in_place(xs: &mut [f32]) {
        let m = max(xs);
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp(c[i] - m);
                acc[i] += c[i];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - m);
            s += *v;
        }
        let inv = 1.0 / s;
        for v in xs.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// `gate <- silu(gate) * up`, SwiGLU's gating.
    pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len());
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

multiversion! {
    /// RMSNorm of each `weight.len()`-wide row: `x / sqrt(mean(x^2) + eps) * weight`.
    fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
        let d = weight.len();
        for row in x.chunks_exact_mut(d) {
            let mut acc = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
            for c in chunks {
                for i in 0..LANES {
                    acc[i] += c[i] * c[i];
                }
            }
            let ss = acc.iter().sum::<f32>() + tail;
            let scale = 1.0 / (ss / d as f32 + eps).sqrt();
            for (v, w) in row.iter_mut().zip(weight) {
                *v = *v * scale * w;
            }
        }
    }
}

/// RMSNorm in place over rows of width `weight.len()`, rows in parallel.
pub(crate) fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    assert_eq!(x.len() % d, 0);
    x.par_chunks_mut(d * 64).for_each(|rows| rms_norm_rows(rows, weight, eps));
}

/// Cosine and sine tables `[seq, head_dim / 2]` for positions `0..seq`.
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    /// Tables for `seq` positions from the inverse frequencies (one per pair of dimensions).
    pub(crate) fn new(inv_freq: &[f64], seq: usize) -> Rope {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in 0..seq {
            for &f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope { cos, sin, half }
    }

    /// Rotates every head of `x` (`[batch * seq, heads * head_dim]`) by its position, with
    /// Hugging Face's rotate-half pairing: dimension `i` pairs with `i + head_dim / 2`.
    pub(crate) fn apply(&self, x: &mut [f32], seq: usize, heads: usize) {
        let half = self.half;
        let width = heads * 2 * half;
        assert_eq!(x.len() % (width * seq), 0);
        x.par_chunks_mut(width).enumerate().for_each(|(row, xr)| {
            let p = row % seq;
            let (c, s) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
            for head in xr.chunks_exact_mut(2 * half) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * c[i] - b * s[i];
                    hi[i] = b * c[i] + a * s[i];
                }
            }
        });
    }
}

/// Query rows per attention tile: keys beyond a tile's last row are never touched, which skips
/// most of the causally masked half of the score matrix.
const QUERY_TILE: usize = 64;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Each query sees at most this many most recent keys (itself included).
    pub window: Option<usize>,
}

/// Causal grouped-query attention.
///
/// `q` is `[batch * seq, heads * head_dim]`, `k` and `v` are `[batch * seq, kv_heads * head_dim]`
/// (rotary embeddings already applied); query head `h` reads key/value head
/// `h / (heads / kv_heads)`. Returns `[batch * seq, heads * head_dim]`.
///
/// Work is split over (window, kv head) pairs with rayon. The query heads sharing a kv head are
/// stacked into one matrix per tile, so each key/value tile is packed once for all of them.
pub(crate) fn attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
    let (seq, hd) = (s.seq, s.head_dim);
    let qw = s.heads * hd;
    let kw = s.kv_heads * hd;
    assert_eq!(q.len(), s.batch * seq * qw);
    assert_eq!(k.len(), s.batch * seq * kw);
    assert_eq!(v.len(), k.len());
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_group: Vec<Vec<f32>> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, g) = (task / s.kv_heads, task % s.kv_heads);
            let k0 = b * seq * kw + g * hd;
            // `out` is [group, seq, hd]; the tile buffers stack the group's heads the same way.
            let mut out = vec![0f32; group * seq * hd];
            let mut q_tile = vec![0f32; group * QUERY_TILE * hd];
            let mut o_tile = vec![0f32; group * QUERY_TILE * hd];
            let mut scores = vec![0f32; group * QUERY_TILE * seq];
            for t0 in (0..seq).step_by(QUERY_TILE) {
                let t1 = (t0 + QUERY_TILE).min(seq);
                let rows = t1 - t0;
                let m = group * rows;
                for j in 0..group {
                    let h = g * group + j;
                    for r in 0..rows {
                        let src = &q[(b * seq + t0 + r) * qw + h * hd..][..hd];
                        for (d, x) in q_tile[(j * rows + r) * hd..][..hd].iter_mut().zip(src) {
                            *d = x * scale;
                        }
                    }
                }
                // Keys this tile can see: up to its last query, and within the window of its first.
                let first_key = s.window.map_or(0, |w| (t0 + 1).saturating_sub(w));
                let nk = t1 - first_key;
                matmul_strided(
                    MatRef { data: &q_tile, rows: m, cols: hd, row_stride: hd, col_stride: 1 },
                    MatRef { data: &k[k0 + first_key * kw..], rows: nk, cols: hd, row_stride: kw, col_stride: 1 },
                    &mut scores,
                    nk,
                    false,
                );
                for (i, row) in scores[..m * nk].chunks_exact_mut(nk).enumerate() {
                    let pos = t0 + i % rows;
                    let lo = s.window.map_or(0, |w| (pos + 1).saturating_sub(w)) - first_key;
                    let hi = pos + 1 - first_key;
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    softmax_in_place(&mut row[lo..hi]);
                }
                // P V, with V^T read through strides.
                matmul_strided(
                    MatRef { data: &scores, rows: m, cols: nk, row_stride: nk, col_stride: 1 },
                    MatRef { data: &v[k0 + first_key * kw..], rows: hd, cols: nk, row_stride: 1, col_stride: kw },
                    &mut o_tile,
                    hd,
                    false,
                );
                for j in 0..group {
                    out[(j * seq + t0) * hd..(j * seq + t1) * hd].copy_from_slice(&o_tile[j * rows * hd..(j + 1) * rows * hd]);
                }
            }
            out
        })
        .collect();
    // Heads back into rows, one window per task.
    let mut y = vec![0f32; s.batch * seq * qw];
    y.par_chunks_mut(seq * qw).enumerate().for_each(|(b, y)| {
        for g in 0..s.kv_heads {
            let out = &per_group[b * s.kv_heads + g];
            for j in 0..group {
                let h = g * group + j;
                for t in 0..seq {
                    y[t * qw + h * hd..][..hd].copy_from_slice(&out[(j * seq + t) * hd..][..hd]);
                }
            }
        }
    });
    y
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn exp_is_accurate_over_the_useful_range() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(((got - want) / want).abs() < 5e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn reductions_match_plain_loops() {
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            let xs: Vec<f32> = values(n, 7).iter().map(|v| v * 10.0).collect();
            let ys: Vec<f32> = values(n, 8).iter().map(|v| v * 10.0).collect();
            let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), m);
            let se: f64 = xs.iter().map(|&x| ((x - 3.0) as f64).exp()).sum();
            assert!((sum_exp(&xs, 3.0) - se).abs() <= 1e-6 * se.max(1e-30));
            let sd: f64 = xs.iter().zip(&ys).map(|(&a, &b)| ((a - 3.0) as f64).exp() * (a - b) as f64).sum();
            assert!((sum_exp_times_diff(&xs, &ys, 3.0) - sd).abs() <= 1e-5 * se.max(1.0));
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let d = 37;
        let mut x = values(3 * d, 1);
        let w = values(d, 2);
        let orig = x.clone();
        rms_norm(&mut x, &w, 1e-5);
        for r in 0..3 {
            let row = &orig[r * d..(r + 1) * d];
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                let want = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                assert!((x[r * d + i] as f64 - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn silu_mul_matches_definition() {
        let mut g = values(50, 3).iter().map(|v| v * 20.0).collect::<Vec<_>>();
        let u = values(50, 4);
        let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64).collect();
        silu_mul(&mut g, &u);
        for (a, b) in g.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
    }

    #[test]
    fn rope_rotates_half_pairs_by_position() {
        let (seq, heads, hd) = (5, 2, 8);
        let inv: Vec<f64> = (0..hd / 2).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64)).collect();
        let rope = Rope::new(&inv, seq);
        let orig = values(2 * seq * heads * hd, 5);
        let mut x = orig.clone();
        rope.apply(&mut x, seq, heads);
        for row in 0..2 * seq {
            let p = (row % seq) as f64;
            for h in 0..heads {
                let base = row * heads * hd + h * hd;
                for i in 0..hd / 2 {
                    let (a, b) = (orig[base + i] as f64, orig[base + i + hd / 2] as f64);
                    let (c, s) = ((p * inv[i]).cos(), (p * inv[i]).sin());
                    assert!((x[base + i] as f64 - (a * c - b * s)).abs() < 1e-6);
                    assert!((x[base + i + hd / 2] as f64 - (b * c + a * s)).abs() < 1e-6);
                }
            }
        }
    }

    /// Attention written as directly as possible: every score, masked softmax, weighted sum.
    pub(crate) fn attention_reference(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
        let (seq, hd) = (s.seq, s.head_dim);
        let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
        let mut y = vec![0f32; s.batch * seq * qw];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let kvh = h * s.kv_heads / s.heads;
                for i in 0..seq {
                    let qi = &q[(b * seq + i) * qw + h * hd..][..hd];
                    let lo = s.window.map_or(0, |w| (i + 1).saturating_sub(w));
                    let scores: Vec<f64> = (lo..=i)
                        .map(|j| {
                            let kj = &k[(b * seq + j) * kw + kvh * hd..][..hd];
                            qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for d in 0..hd {
                        let mut acc = 0f64;
                        for (n, j) in (lo..=i).enumerate() {
                            acc += (scores[n] - m).exp() / z * v[(b * seq + j) * kw + kvh * hd + d] as f64;
                        }
                        y[(b * seq + i) * qw + h * hd + d] = acc as f32;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn attention_matches_reference_loops() {
        // seq spans several query tiles and ends in a partial one; 6 heads share 2 kv heads.
        for window in [None, Some(50)] {
            let s = AttnShape { batch: 2, seq: 150, heads: 6, kv_heads: 2, head_dim: 16, window };
            let q: Vec<f32> = values(2 * 150 * 6 * 16, 11).iter().map(|x| x * 2.0).collect();
            let k: Vec<f32> = values(2 * 150 * 2 * 16, 12).iter().map(|x| x * 2.0).collect();
            let v = values(2 * 150 * 2 * 16, 13);
            let got = attention(&q, &k, &v, s);
            let want = attention_reference(&q, &k, &v, s);
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-5, "window {window:?}: max error {err}");
        }
    }

    #[test]
    fn attention_is_causal_and_maps_query_heads_to_their_kv_head() {
        let s = AttnShape { batch: 1, seq: 70, heads: 4, kv_heads: 2, head_dim: 8, window: None };
        let q = values(70 * 4 * 8, 1);
        let k = values(70 * 2 * 8, 2);
        let mut v = values(70 * 2 * 8, 3);
        let base = attention(&q, &k, &v, s);
        // Changing the last position's value of kv head 1 changes only the last row of heads 2, 3.
        for d in 0..8 {
            v[69 * 16 + 8 + d] += 1.0;
        }
        let after = attention(&q, &k, &v, s);
        for t in 0..70 {
            for h in 0..4 {
                let r = t * 32 + h * 8;
                let changed = base[r..r + 8] != after[r..r + 8];
                assert_eq!(changed, t == 69 && h >= 2, "position {t} head {h}");
            }
        }
    }
}
