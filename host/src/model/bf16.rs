//! A Linear whose products run in BF16 with F32 sums, on AVX512-BF16's `vdpbf16ps` (twice the
//! multiply-adds of an F32 FMA per instruction). Calibration runs its block forwards through
//! these: the activations only steer the method's statistics, which the reference tools
//! gather in the model's own (often half) precision anyway.
//!
//! The weight is packed once: panels of 16 outputs, each holding, for every pair of inputs
//! `(2p, 2p + 1)`, one 32-bit word per output with `bf16(w[o][2p])` low and `bf16(w[o][2p+1])`
//! high. An input row rounded to BF16 is already such pairs, so one `vdpbf16ps` with a
//! broadcast input pair adds two products to 16 outputs.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::linear::LinearOp;

/// Input rows per kernel tile (broadcast operands).
const MR: usize = 8;
/// Panels (of 16 outputs) per kernel tile.
const PANELS: usize = 3;
/// Outputs per kernel tile.
const NR: usize = 16 * PANELS;
/// Input rows per parallel task: the task's rows stay in cache while every panel passes.
const ROWS_PER_TASK: usize = 64;

/// True when this CPU runs [`Bf16Linear`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// BF16 bits of a finite `v`, rounded to nearest even.
#[inline(always)]
fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// `y = x W^T + b` with BF16 products; build only when [`available`].
pub struct Bf16Linear {
    /// `[out_padded / 16][pairs][16]` words (see the module doc); padding is zero.
    panels: Vec<u32>,
    pairs: usize,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl Bf16Linear {
    /// Packs a row-major `[out_features, in_features]` F32 weight.
    pub fn new(weight: &[f32], bias: Option<Vec<f32>>, out_features: usize, in_features: usize) -> Result<Bf16Linear> {
        ensure!(available(), "this CPU has no AVX512-BF16");
        ensure!(
            weight.len() == out_features * in_features,
            "weight has {} values, expected {out_features} x {in_features}",
            weight.len()
        );
        ensure!(bias.as_ref().is_none_or(|b| b.len() == out_features), "bias does not have {out_features} values");
        let pairs = in_features.div_ceil(2);
        let padded = out_features.div_ceil(NR) * NR;
        let mut panels = vec![0u32; padded * pairs];
        panels.par_chunks_mut(16 * pairs).enumerate().for_each(|(panel, words)| {
            for l in 0..16 {
                let o = panel * 16 + l;
                if o >= out_features {
                    break;
                }
                let row = &weight[o * in_features..(o + 1) * in_features];
                for p in 0..pairs {
                    let lo = to_bf16(row[2 * p]) as u32;
                    let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
                    words[p * 16 + l] = lo | hi << 16;
                }
            }
        });
        Ok(Bf16Linear { panels, pairs, bias, out_features, in_features })
    }
}

impl LinearOp for Bf16Linear {
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (inp, out, pairs) = (self.in_features, self.out_features, self.pairs);
        ensure!(x.len() == rows * inp, "linear input has {} values, expected {rows} rows x {inp}", x.len());
        // Every output is written once by a tile store: no zeroing of the (large) result first,
        // which would be one core's memset.
        let mut y: Vec<f32> = Vec::with_capacity(rows * out);
        y.spare_capacity_mut()[..rows * out].par_chunks_mut(ROWS_PER_TASK * out).enumerate().for_each(|(task, y)| {
            let r0 = task * ROWS_PER_TASK;
            let n = y.len() / out;
            // The task's rows in BF16, padded to whole tiles and an even width with zeros.
            let mut xb = vec![0u16; n.div_ceil(MR) * MR * 2 * pairs];
            for r in 0..n {
                let src = &x[(r0 + r) * inp..(r0 + r + 1) * inp];
                xb[r * 2 * pairs..r * 2 * pairs + inp].iter_mut().zip(src).for_each(|(d, &v)| *d = to_bf16(v));
            }
            for o0 in (0..out).step_by(NR) {
                let bias = self.bias.as_ref().map(|b| &b[o0..(o0 + NR).min(out)]);
                for m0 in (0..n).step_by(MR) {
                    let tile = Tile { y: &mut y[m0 * out..], stride: out, col: o0, rows: (n - m0).min(MR), cols: (out - o0).min(NR), bias };
                    // SAFETY: `available()` was checked at construction; `xb` holds MR whole rows
                    // of 2 * pairs values from m0, the panels from o0 / 16 hold PANELS panels
                    // of `pairs * 16` words (outputs are padded to whole tiles), and `tile`
                    // covers rows and columns that exist in `y`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        tile_kernel(&xb[m0 * 2 * pairs..], &self.panels[o0 / 16 * 16 * pairs..], pairs, tile)
                    };
                }
            }
        });
        // SAFETY: the tiles above wrote every one of the rows * out values.
        unsafe { y.set_len(rows * out) };
        Ok(y)
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }
}

/// Where a kernel tile lands: `rows x cols` values at column `col` of the rows of `y` (row
/// length `stride`), plus `bias` (the tile's `cols` values) when given.
struct Tile<'a> {
    y: &'a mut [std::mem::MaybeUninit<f32>],
    stride: usize,
    col: usize,
    rows: usize,
    cols: usize,
    bias: Option<&'a [f32]>,
}

/// Writes into `tile` the dot products of its input rows (BF16 pairs from `x`, MR rows) with
/// its outputs (the `PANELS` panels starting at `w`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_kernel(x: &[u16], w: &[u32], pairs: usize, tile: Tile<'_>) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= MR * 2 * pairs && w.len() >= PANELS * 16 * pairs);
    debug_assert!(tile.rows <= MR && tile.cols <= NR && tile.y.len() >= (tile.rows - 1) * tile.stride + tile.col + tile.cols);
    let a = x.as_ptr() as *const u32;
    let b = w.as_ptr();
    let stride = 16 * pairs;
    let mut acc = [[_mm512_setzero_ps(); PANELS]; MR];
    for p in 0..pairs {
        // Plain statements, no closure: intrinsics must inline into this target_feature body.
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 16) as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(stride + p * 16) as *const __m512i));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(2 * stride + p * 16) as *const __m512i));
        for (m, acc_m) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(a.add(m * pairs + p).read_unaligned() as i32));
            acc_m[0] = _mm512_dpbf16_ps(acc_m[0], av, b0);
            acc_m[1] = _mm512_dpbf16_ps(acc_m[1], av, b1);
            acc_m[2] = _mm512_dpbf16_ps(acc_m[2], av, b2);
        }
    }
    let y = tile.y.as_mut_ptr() as *mut f32;
    for v in 0..PANELS {
        let cols = tile.cols.saturating_sub(16 * v).min(16);
        if cols == 0 {
            break;
        }
        let mask: __mmask16 = if cols == 16 { 0xFFFF } else { (1u16 << cols) - 1 };
        let bias = match tile.bias {
            Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(16 * v)),
            None => _mm512_setzero_ps(),
        };
        for (m, acc_m) in acc.iter().enumerate().take(tile.rows) {
            _mm512_mask_storeu_ps(y.add(m * tile.stride + tile.col + 16 * v), mask, _mm512_add_ps(acc_m[v], bias));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_products_of_the_bf16_rounded_operands() {
        if !available() {
            eprintln!("skipping: no AVX512-BF16");
            return;
        }
        // Odd widths, outputs and rows that do not fill tiles, more rows than one task.
        for (rows, inp, out, bias) in [(1, 1, 1, false), (7, 33, 49, true), (130, 576, 192, false), (70, 1536, 100, true)] {
            let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
            let w: Vec<f32> = (0..out * inp).map(|i| ((i * 104_729 % 2003) as f32 - 1001.0) / 3001.0).collect();
            let b: Option<Vec<f32>> = bias.then(|| (0..out).map(|o| o as f32 / 7.0).collect());
            let y = Bf16Linear::new(&w, b.clone(), out, inp).unwrap().forward(&x, rows).unwrap();
            let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
            for i in 0..rows {
                for o in 0..out {
                    let dot: f64 = (0..inp).map(|k| r(x[i * inp + k]) * r(w[o * inp + k])).sum();
                    let want = dot + b.as_ref().map_or(0.0, |b| b[o] as f64);
                    let got = y[i * out + o] as f64;
                    assert!((got - want).abs() <= 1e-5 * (inp as f64).sqrt() * want.abs().max(1.0), "({i},{o}) of {rows}x{inp}x{out}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn refuses_wrong_input_length() {
        if !available() {
            return;
        }
        let l = Bf16Linear::new(&[1.0; 6], None, 2, 3).unwrap();
        assert!(l.forward(&[1.0; 5], 2).is_err());
    }
}

