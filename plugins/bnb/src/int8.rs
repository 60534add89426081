//! LLM.int8(): row-wise absmax int8 weights (`weight` + `SCB`) and the mixed-precision forward.
//!
//! Quantization follows bitsandbytes' `Int8Params`: the weight is first cast to F16, `SCB[row]` is the
//! row's largest |value| after that cast, and `CB = round_half_even(w16 * (127 / SCB))` in F32.

use kvant_plugin_api::Error;
use rayon::prelude::*;

use crate::input::Floats;

/// `weight_format` byte bitsandbytes stores next to an int8 weight: 0 is plain row-major.
pub const WEIGHT_FORMAT_ROW: u8 = 0;

/// `1/127` as bitsandbytes multiplies by it when dequantizing (its 7.874015718698502e-3 as an F32
/// constant, not a division).
const INV_127: f32 = 7.874_016e-3;

/// `1/127^2`, bitsandbytes' constant for undoing both int8 scales of a product.
const INV_127_SQ: f32 = 6.200_124e-5;

/// An int8 weight: `cb` row-major `[rows, cols]` and one scale per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Weight {
    /// Quantized values (`weight`, int8).
    pub cb: Vec<i8>,
    /// Row absmax of the F16-cast weight (`SCB`, F32).
    pub scb: Vec<f32>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

/// Quantizes a `[rows, cols]` weight row by row.
pub fn quantize(src: Floats<'_>, rows: usize, cols: usize) -> Result<Int8Weight, Error> {
    if src.len() != rows * cols || cols == 0 {
        return Err(Error::new(format!("{} elements is not a [{rows}, {cols}] weight", src.len())));
    }
    let mut cb = vec![0i8; rows * cols];
    let mut scb = vec![0f32; rows];
    cb.par_chunks_mut(cols).zip(scb.par_iter_mut()).enumerate().for_each(|(r, (q, s))| {
        let mut row = vec![0f32; cols];
        src.load(r * cols, &mut row);
        quantize_row(&mut row, q, s);
    });
    Ok(Int8Weight { cb, scb, rows, cols })
}

/// One row: cast to F16 (in place), take its absmax, round to int8.
fn quantize_row(row: &mut [f32], q: &mut [i8], scale: &mut f32) {
    round_to_f16(row);
    let m = crate::four_bit::max_abs(row);
    *scale = m;
    let k = 127.0 / m;
    for (q, &v) in q.iter_mut().zip(row.iter()) {
        *q = to_i8(round_half_even(v * k));
    }
}

/// Rounds half to even for |v| < 2^22 (here |v| <= 127): adding and subtracting 1.5 * 2^23 leaves
/// no fraction bits, and the FPU's own rounding of that sum is ties-to-even. Vectorizes, unlike the
/// library call `round_ties_even` becomes without SSE4.1.
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Rounds to the nearest F16 value (ties to even), in place; the slice conversions use F16C when present.
fn round_to_f16(v: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let mut h = vec![half::f16::ZERO; v.len()];
    h.convert_from_f32_slice(v);
    h.convert_to_f32_slice(v);
}

/// F32 -> int8 as torch converts on x86: truncate to a 32-bit integer (NaN and overflow become
/// i32::MIN), keep the low byte.
fn to_i8(v: f32) -> i8 {
    let i = if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) { i32::MIN } else { v as i32 };
    i as i8
}

/// Dequantizes to F32: `(CB * SCB) * (1/127)`, as bitsandbytes does.
pub fn dequantize(w: &Int8Weight) -> Vec<f32> {
    let mut out = kvant_plugin_api::dense::zeroed(w.cb.len());
    out.par_chunks_mut(w.cols).zip(w.cb.par_chunks(w.cols)).zip(w.scb.par_iter()).for_each(|((o, q), &s)| {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = (q as f32 * s) * INV_127;
        }
    });
    out
}

/// `y = x W^T (+ bias)` with LLM.int8()'s decomposition: input columns holding any |x| >= `threshold`
/// (after the F16 cast) go through the dequantized weight columns in F32; the rest are quantized row-wise
/// to int8 and multiplied in integers. `threshold <= 0` quantizes every column. `x` is `[batch, cols]`.
pub fn forward(w: &Int8Weight, x: &[f32], batch: usize, threshold: f32, bias: Option<&[f32]>) -> Result<Vec<f32>, Error> {
    let (rows, cols) = (w.rows, w.cols);
    if x.len() != batch * cols {
        return Err(Error::new(format!("input has {} values, expected [{batch}, {cols}]", x.len())));
    }
    let mut x16 = x.to_vec();
    round_to_f16(&mut x16);
    let outlier = |v: f32| threshold > 0.0 && v.abs() >= threshold;
    let outlier_cols: Vec<usize> =
        (0..cols).filter(|&c| (0..batch).any(|b| outlier(x16[b * cols + c]))).collect();

    // Activations to int8 row by row: outliers themselves are zeroed before the row absmax is taken,
    // the whole outlier columns only after rounding (bitsandbytes' int8_vectorwise_quant).
    let mut ca = vec![0i8; batch * cols];
    let mut sca = vec![0f32; batch];
    for b in 0..batch {
        let mut row: Vec<f32> = x16[b * cols..(b + 1) * cols].iter().map(|&v| if outlier(v) { 0.0 } else { v }).collect();
        let q = &mut ca[b * cols..(b + 1) * cols];
        quantize_row(&mut row, q, &mut sca[b]);
        outlier_cols.iter().for_each(|&c| q[c] = 0);
    }

    let mut y = vec![0f32; batch * rows];
    for b in 0..batch {
        let a = &ca[b * cols..(b + 1) * cols];
        let xo = &x[b * cols..(b + 1) * cols];
        y[b * rows..(b + 1) * rows].par_iter_mut().enumerate().for_each(|(o, y)| {
            let q = &w.cb[o * cols..(o + 1) * cols];
            let acc: i32 = a.iter().zip(q).map(|(&a, &q)| a as i32 * q as i32).sum();
            let mut v = acc as f32 * (sca[b] * w.scb[o]) * INV_127_SQ;
            for &c in &outlier_cols {
                v += xo[c] * ((q[c] as f32 * w.scb[o]) * INV_127);
            }
            *y = v + bias.map_or(0.0, |bias| bias[o]);
        });
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_half_to_even_after_the_f16_cast() {
        let w = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5];
        let q = quantize(Floats::from_f32(&w), 1, 6).unwrap();
        assert_eq!(q.scb, [127.0]);
        assert_eq!(q.cb, [127, 0, 2, 2, 0, -2]);
        assert_eq!(dequantize(&q)[0], 127.0);
    }

    #[test]
    fn forward_matches_dense_without_outliers_closely() {
        let w: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
        let q = quantize(Floats::from_f32(&w), 8, 8).unwrap();
        let x: Vec<f32> = (0..8).map(|i| i as f32 / 8.0 - 0.4).collect();
        let dense = dequantize(&q);
        let want: Vec<f32> = (0..8).map(|o| (0..8).map(|k| dense[o * 8 + k] * x[k]).sum()).collect();
        let got = forward(&q, &x, 1, 6.0, None).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 0.02, "{a} vs {b}");
        }
        // an outlier column goes through the dense path exactly
        let mut x2 = vec![0f32; 8];
        x2[3] = 100.0;
        let got = forward(&q, &x2, 1, 6.0, None).unwrap();
        for o in 0..8 {
            assert!((got[o] - 100.0 * dense[o * 8 + 3]).abs() < 1e-4);
        }
    }
}
