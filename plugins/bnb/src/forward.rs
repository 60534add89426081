//! `y = x W^T + b` straight from packed 4-bit weights, never materialising the dense matrix:
//! each block's 16-entry table is scaled by its absmax (and rounded to the weight's dtype, as
//! bitsandbytes' dequantization does) once, and the codes index it directly.

use kvant_plugin_api::{DType, Error};
use rayon::prelude::*;

use crate::four_bit::QuantType;

/// A packed 4-bit Linear weight `[rows, cols]` with its absmax already in F32.
#[derive(Clone, Copy, Debug)]
pub struct Weight4<'a> {
    /// Packed codes of the row-major flattened weight.
    pub packed: &'a [u8],
    /// One F32 scale per block (decompressed when double-quantized).
    pub absmax: &'a [f32],
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// 4-bit blocksize.
    pub blocksize: usize,
    /// Code table.
    pub quant_type: QuantType,
    /// Dtype the dequantized weights are rounded to (the original weight's: F32, F16 or BF16).
    pub dtype: DType,
}

/// `v` rounded to `dtype` (nearest, ties to even) and widened back.
fn round_to(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// `x` is `[batch, cols]` row-major; returns `[batch, rows]`.
pub fn forward(w: &Weight4<'_>, x: &[f32], batch: usize, bias: Option<&[f32]>) -> Result<Vec<f32>, Error> {
    let (rows, cols, bs) = (w.rows, w.cols, w.blocksize);
    let n = rows * cols;
    if x.len() != batch * cols {
        return Err(Error::new(format!("input has {} values, expected [{batch}, {cols}]", x.len())));
    }
    if w.packed.len() < n.div_ceil(2) || w.absmax.len() < n.div_ceil(bs) {
        return Err(Error::new("packed weight or absmax too short for its shape"));
    }
    if bias.is_some_and(|b| b.len() != rows) {
        return Err(Error::new(format!("bias must have {rows} values")));
    }
    if !matches!(w.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::new(format!("4-bit weights dequantize to F32, F16 or BF16, not {}", w.dtype)));
    }
    let codes = w.quant_type.dequant_codes();
    let mut yt = vec![0f32; rows * batch]; // [rows, batch]: one task writes one row's outputs
    // With whole blocks per row (the usual case), rows are independent runs of whole blocks.
    let aligned = cols % bs == 0;
    yt.par_chunks_mut(batch).with_min_len(16).enumerate().for_each(|(r, out)| {
        if aligned && batch == 1 {
            let bytes = &w.packed[r * cols / 2..(r + 1) * cols / 2];
            let scales = &w.absmax[r * cols / bs..(r + 1) * cols / bs];
            out[0] = row_dot(bytes, scales, &codes, bs, w.dtype, x);
        } else {
            let row = decode_row(w, &codes, r);
            for (b, o) in out.iter_mut().enumerate() {
                *o = dot(&row, &x[b * cols..(b + 1) * cols]);
            }
        }
    });
    let mut y = vec![0f32; batch * rows];
    for r in 0..rows {
        for b in 0..batch {
            y[b * rows + r] = yt[r * batch + b] + bias.map_or(0.0, |bias| bias[r]);
        }
    }
    Ok(y)
}

/// Row `r` dequantized to F32, for shapes whose blocks straddle rows and for batches.
fn decode_row(w: &Weight4<'_>, codes: &[f32; 16], r: usize) -> Vec<f32> {
    (r * w.cols..(r + 1) * w.cols)
        .map(|e| {
            let byte = w.packed[e / 2];
            let q = if e % 2 == 0 { byte >> 4 } else { byte & 0x0F };
            round_to(codes[q as usize] * w.absmax[e / w.blocksize], w.dtype)
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums so the loop vectorizes.
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (a, b) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

/// One output of a batch-1 product: a row of whole blocks against `x`.
fn row_dot(bytes: &[u8], scales: &[f32], codes: &[f32; 16], bs: usize, dtype: DType, x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if bs.is_multiple_of(32) {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present, checked just above.
            return unsafe { avx512::row_dot(bytes, scales, codes, bs, dtype, x) };
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX2, FMA and F16C are present, checked just above.
            return unsafe { avx2::row_dot(bytes, scales, codes, bs, dtype, x) };
        }
    }
    let mut sum = 0f32;
    for (b, &scale) in scales.iter().enumerate() {
        let table = codes.map(|c| round_to(c * scale, dtype));
        let xs = &x[b * bs..(b + 1) * bs];
        let mut acc = [0f32; 2];
        for (byte, pair) in bytes[b * bs / 2..(b + 1) * bs / 2].iter().zip(xs.chunks_exact(2)) {
            acc[0] += table[(byte >> 4) as usize] * pair[0];
            acc[1] += table[(byte & 0x0F) as usize] * pair[1];
        }
        sum += acc[0] + acc[1];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use kvant_plugin_api::DType;

    /// 32 weights (16 bytes) per step: nibbles are interleaved back into element order, widened
    /// to 32-bit indices and looked up in the block's scaled table with two 8-entry permutes,
    /// bit 3 of the code choosing between them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dot(bytes: &[u8], scales: &[f32], codes: &[f32; 16], bs: usize, dtype: DType, x: &[f32]) -> f32 {
        debug_assert!(bytes.len() * 2 == scales.len() * bs && x.len() >= scales.len() * bs);
        let lo_codes = _mm256_loadu_ps(codes.as_ptr());
        let hi_codes = _mm256_loadu_ps(codes.as_ptr().add(8));
        let mask = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut bp = bytes.as_ptr();
        let mut xp = x.as_ptr();
        for &scale in scales {
            let s = _mm256_set1_ps(scale);
            let t_lo = round(_mm256_mul_ps(lo_codes, s), dtype);
            let t_hi = round(_mm256_mul_ps(hi_codes, s), dtype);
            for _ in 0..bs / 32 {
                let v = _mm_loadu_si128(bp.cast());
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                let lo = _mm_and_si128(v, mask);
                let first = _mm_unpacklo_epi8(hi, lo);
                let second = _mm_unpackhi_epi8(hi, lo);
                let idx = [
                    _mm256_cvtepu8_epi32(first),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(first, 8)),
                    _mm256_cvtepu8_epi32(second),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(second, 8)),
                ];
                for (k, idx) in idx.into_iter().enumerate() {
                    let a = _mm256_permutevar8x32_ps(t_lo, idx);
                    let b = _mm256_permutevar8x32_ps(t_hi, idx);
                    let w = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                    acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(8 * k)), acc[k]);
                }
                bp = bp.add(16);
                xp = xp.add(32);
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)))
    }

    /// Rounds eight values to `dtype` and back: BF16 on the bits (ties to even), F16 through F16C.
    #[inline(always)]
    unsafe fn round(t: __m256, dtype: DType) -> __m256 {
        match dtype {
            DType::BF16 => {
                let bits = _mm256_castps_si256(t);
                let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
                let r = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
                _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(0xFFFF_0000u32 as i32)))
            }
            DType::F16 => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(t)),
            _ => t,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use kvant_plugin_api::DType;

    /// 32 weights per step like the AVX2 version, but the whole 16-entry table fits one register,
    /// so each 16 codes are one permute.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_dot(bytes: &[u8], scales: &[f32], codes: &[f32; 16], bs: usize, dtype: DType, x: &[f32]) -> f32 {
        debug_assert!(bytes.len() * 2 == scales.len() * bs && x.len() >= scales.len() * bs);
        let table = _mm512_loadu_ps(codes.as_ptr());
        let mask = _mm_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut bp = bytes.as_ptr();
        let mut xp = x.as_ptr();
        for &scale in scales {
            let t = round(_mm512_mul_ps(table, _mm512_set1_ps(scale)), dtype);
            for _ in 0..bs / 32 {
                let v = _mm_loadu_si128(bp.cast());
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                let lo = _mm_and_si128(v, mask);
                let w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), t);
                let w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), t);
                acc[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0]);
                acc[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[1]);
                bp = bp.add(16);
                xp = xp.add(32);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    /// Rounds sixteen values to `dtype` and back, as the AVX2 version does.
    #[inline(always)]
    unsafe fn round(t: __m512, dtype: DType) -> __m512 {
        match dtype {
            DType::BF16 => {
                let bits = _mm512_castps_si512(t);
                let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                let r = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
                _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(0xFFFF_0000u32 as i32)))
            }
            DType::F16 => _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t)),
            _ => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::four_bit::{dequantize, quantize};
    use crate::input::Floats;

    fn check(rows: usize, cols: usize, bs: usize, batch: usize, qt: QuantType) {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0).collect();
        let q = quantize(Floats::from_f32(&w), bs, qt).unwrap();
        let dense = dequantize(&q.packed, &q.absmax, w.len(), bs, qt).unwrap();
        let x: Vec<f32> = (0..batch * cols).map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0).collect();
        let bias: Vec<f32> = (0..rows).map(|r| r as f32 * 0.5).collect();
        let wt = Weight4 { packed: &q.packed, absmax: &q.absmax, rows, cols, blocksize: bs, quant_type: qt, dtype: DType::F32 };
        let y = forward(&wt, &x, batch, Some(&bias)).unwrap();
        for b in 0..batch {
            for r in 0..rows {
                let want: f64 = (0..cols).map(|k| dense[r * cols + k] as f64 * x[b * cols + k] as f64).sum::<f64>() + bias[r] as f64;
                let got = y[b * rows + r] as f64;
                assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "[{b},{r}] {got} vs {want}");
            }
        }
    }

    /// Every kernel this CPU can run gives the portable result (up to summation order), for every
    /// rounding of the weights.
    #[test]
    fn kernels_agree_with_the_portable_loop() {
        let (rows, cols, bs) = (3, 256, 64);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0).collect();
        let q = quantize(Floats::from_f32(&w), bs, QuantType::Fp4).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.1).cos()).collect();
        let codes = QuantType::Fp4.dequant_codes();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let wt = Weight4 { packed: &q.packed, absmax: &q.absmax, rows, cols, blocksize: bs, quant_type: QuantType::Fp4, dtype };
            for r in 0..rows {
                let bytes = &q.packed[r * cols / 2..(r + 1) * cols / 2];
                let scales = &q.absmax[r * cols / bs..(r + 1) * cols / bs];
                let want: f32 = decode_row(&wt, &codes, r).iter().zip(&x).map(|(a, b)| a * b).sum();
                let portable = row_dot(bytes, scales, &codes, bs, dtype, &x);
                assert!((portable - want).abs() < 1e-4, "{dtype}: {portable} vs {want}");
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
                        let got = unsafe { avx2::row_dot(bytes, scales, &codes, bs, dtype, &x) };
                        assert!((got - want).abs() < 1e-4, "avx2 {dtype}: {got} vs {want}");
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        let got = unsafe { avx512::row_dot(bytes, scales, &codes, bs, dtype, &x) };
                        assert!((got - want).abs() < 1e-4, "avx512 {dtype}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_dequantized_product() {
        check(20, 128, 64, 1, QuantType::Nf4);
        check(20, 128, 32, 1, QuantType::Fp4);
        check(5, 96, 32, 3, QuantType::Nf4); // batch
        check(7, 33, 64, 1, QuantType::Fp4); // blocks straddle rows, odd element count
    }
}
