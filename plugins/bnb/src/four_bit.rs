//! NF4 and FP4: bitsandbytes' blockwise 4-bit quantization, reproduced bit for bit.
//!
//! What bitsandbytes 0.50 does on the CPU (its `quantize_4bit` default kernel), and so what this does:
//! - the weight is flattened row-major and widened to F32 (BF16 and F16 inputs are computed in F32);
//! - each full block of `blocksize` elements stores `absmax = max|x|` and scales by the reciprocal of
//!   `max(absmax, 1e-38)`; the last partial block instead stores the clamped absmax and *divides* by it;
//! - scaled values are clamped to [-1, 1] and bucketed against the 15 midpoints of the sorted code table,
//!   a value exactly on a midpoint going to the lower code (`torch.bucketize`, `right=False`);
//! - codes are packed two per byte, element 2k in the high nibble; an odd count is padded with the code of 0.

use kvant_plugin_api::Error;
use rayon::prelude::*;

use crate::input::Floats;

/// The two 4-bit data types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of a standard normal (QLoRA).
    Nf4,
    /// A 4-bit float: 1 sign, 2 exponent, 1 mantissa bit.
    Fp4,
}

/// The NF4 table, index = code.
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 before normalisation: bit 3 is the sign, the table is divided by its largest magnitude.
/// Code 8 ("-0") is +0.0 in bitsandbytes' table (it is written as the Python integer `-0`).
const FP4_UNSCALED: [f32; 16] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];

/// FP4 codes sorted by value, as `torch.argsort` orders them on the CPU. Of the two zeros, code 0 comes
/// first, so small negative values get code 0 and small positive ones code 8.
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// The lower bound torch's `clamp(min=1e-38)` puts on a block's absmax: 1e-38 is subnormal in F32.
pub(crate) const MIN_ABSMAX: f32 = 1e-38;

/// Largest blocksize bitsandbytes accepts.
pub const MAX_BLOCKSIZE: usize = 4096;

impl QuantType {
    /// Parses `nf4` / `fp4`.
    pub fn parse(s: &str) -> Option<QuantType> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// `nf4` or `fp4`, as bitsandbytes and transformers spell it.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The value each code stands for (the `quant_map` tensor), before scaling by absmax.
    pub fn codes(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4,
            QuantType::Fp4 => FP4_UNSCALED.map(|v| v / 12.0),
        }
    }

    /// The values bitsandbytes' C++ dequantization kernels use: the same as [`Self::codes`] except
    /// that FP4 code 8 is -0.0 there, so dequantized FP4 zeros can carry a sign.
    pub fn dequant_codes(self) -> [f32; 16] {
        let mut c = self.codes();
        if self == QuantType::Fp4 {
            c[8] = -0.0;
        }
        c
    }

    /// Codes in increasing order of value.
    fn order(self) -> [u8; 16] {
        match self {
            QuantType::Nf4 => std::array::from_fn(|i| i as u8),
            QuantType::Fp4 => FP4_ORDER,
        }
    }

    /// The code 0.0 gets, used to pad an odd element count.
    pub fn zero_code(self) -> u8 {
        Encoder::new(self).code(0.0)
    }
}

/// Checks a 4-bit blocksize the way bitsandbytes does: a power of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<(), Error> {
    if blocksize.is_power_of_two() && (32..=MAX_BLOCKSIZE).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::new(format!("blocksize must be a power of two from 32 to 4096, not {blocksize}")))
    }
}

/// Nearest-code search against the midpoints of the sorted table.
#[derive(Clone, Copy)]
struct Encoder {
    mids: [f32; 15],
    order: [u8; 16],
}

impl Encoder {
    fn new(qt: QuantType) -> Self {
        let codes = qt.codes();
        let order = qt.order();
        let mids = std::array::from_fn(|i| (codes[order[i] as usize] + codes[order[i + 1] as usize]) / 2.0);
        Encoder { mids, order }
    }

    /// Code of a scaled value: the number of midpoints strictly below it picks the bucket.
    /// Branch-free so that the block loop vectorizes.
    #[inline(always)]
    fn bucket(&self, s: f32) -> u8 {
        let mut b = 0u8;
        for &m in &self.mids {
            b += (s > m) as u8;
        }
        b
    }

    #[inline(always)]
    fn code(&self, s: f32) -> u8 {
        self.order[self.bucket(s) as usize]
    }
}

/// Packed codes and per-block absmax, exactly as bitsandbytes' `quantize_4bit` returns them.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized4 {
    /// `(n + 1) / 2` bytes, element 2k in the high nibble.
    pub packed: Vec<u8>,
    /// One F32 per block of `blocksize` elements (the last block may be partial).
    pub absmax: Vec<f32>,
}

/// Quantizes the flattened weight `src` to NF4 or FP4 in blocks of `blocksize`.
pub fn quantize(src: Floats<'_>, blocksize: usize, qt: QuantType) -> Result<Quantized4, Error> {
    check_blocksize(blocksize)?;
    let n = src.len();
    let full = n / blocksize;
    let rem = n % blocksize;
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; full + (rem > 0) as usize];
    let enc = Encoder::new(qt);

    // Several blocks per task so that small blocksizes still make tasks worth scheduling.
    let group = (16384 / blocksize).max(1);
    let full_bytes = full * blocksize / 2;
    packed[..full_bytes]
        .par_chunks_mut(group * blocksize / 2)
        .zip(absmax[..full].par_chunks_mut(group))
        .enumerate()
        .for_each(|(g, (bytes, amax))| full_blocks(src, g * group * blocksize, blocksize, &enc, qt, bytes, amax));

    if rem > 0 {
        let mut x = vec![0f32; rem];
        src.load(full * blocksize, &mut x);
        // The partial block keeps the clamped absmax and divides rather than multiplies.
        let am = max_abs(&x).max(MIN_ABSMAX);
        absmax[full] = am;
        let codes: Vec<u8> = x.iter().map(|&v| enc.code((v / am).clamp(-1.0, 1.0))).collect();
        let zero = enc.code(0.0);
        for (k, byte) in packed[full_bytes..].iter_mut().enumerate() {
            let lo = codes.get(2 * k + 1).copied().unwrap_or(zero);
            *byte = (codes[2 * k] << 4) | lo;
        }
    }
    Ok(Quantized4 { packed, absmax })
}

fn full_blocks(src: Floats<'_>, start: usize, bs: usize, enc: &Encoder, qt: QuantType, bytes: &mut [u8], amax: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above; blocksizes are multiples of 16.
        return unsafe { avx2::full_blocks(src, start, bs, enc, qt == QuantType::Fp4, bytes, amax) };
    }
    full_blocks_generic(src, start, bs, enc, bytes, amax)
}

/// Full blocks `start / bs ..`, one per entry of `amax`: the portable version.
fn full_blocks_generic(src: Floats<'_>, start: usize, bs: usize, enc: &Encoder, bytes: &mut [u8], amax: &mut [f32]) {
    let mut x = [0f32; MAX_BLOCKSIZE];
    let mut codes = [0u8; MAX_BLOCKSIZE];
    let (x, codes) = (&mut x[..bs], &mut codes[..bs]);
    for (b, (out, am)) in bytes.chunks_exact_mut(bs / 2).zip(amax.iter_mut()).enumerate() {
        src.load(start + b * bs, x);
        let m = max_abs(x);
        *am = m;
        let inv = 1.0 / m.max(MIN_ABSMAX);
        for (c, &v) in codes.iter_mut().zip(x.iter()) {
            *c = enc.code((v * inv).clamp(-1.0, 1.0));
        }
        for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
            *o = (pair[0] << 4) | pair[1];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use kvant_plugin_api::DType;

    use super::{Encoder, MAX_BLOCKSIZE, MIN_ABSMAX};
    use crate::input::Floats;

    /// The same as `full_blocks_generic`, 16 elements per step: widen to F32, absmax, scale, count
    /// the midpoints below each value (compare masks are -1, so subtracting them counts), remap for
    /// FP4, and pack pairs of codes into bytes.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn full_blocks(
        src: Floats<'_>,
        start: usize,
        bs: usize,
        enc: &Encoder,
        fp4: bool,
        bytes: &mut [u8],
        amax: &mut [f32],
    ) {
        let mut buf = [0f32; MAX_BLOCKSIZE];
        let mids: [__m256; 15] = std::array::from_fn(|i| _mm256_set1_ps(enc.mids[i]));
        let order = enc.order.map(i32::from);
        let order_lo = _mm256_loadu_si256(order.as_ptr().cast());
        let order_hi = _mm256_loadu_si256(order.as_ptr().add(8).cast());
        let (lo, hi, sign) = (_mm256_set1_ps(-1.0), _mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
        let raw = src.bytes();
        for (b, (out, am)) in bytes.chunks_exact_mut(bs / 2).zip(amax.iter_mut()).enumerate() {
            let e0 = start + b * bs;
            let mut vmax = _mm256_setzero_ps();
            for i in (0..bs).step_by(8) {
                let v = match src.dtype() {
                    DType::BF16 => {
                        let h = _mm_loadu_si128(raw.as_ptr().add(2 * (e0 + i)).cast());
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                    }
                    DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(raw.as_ptr().add(2 * (e0 + i)).cast())),
                    _ => _mm256_loadu_ps(raw.as_ptr().add(4 * (e0 + i)).cast()),
                };
                _mm256_storeu_ps(buf.as_mut_ptr().add(i), v);
                vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
            let m = lanes.iter().fold(0f32, |m, &l| m.max(l));
            *am = m;
            let inv = _mm256_set1_ps(1.0 / m.max(MIN_ABSMAX));
            let codes = |p: *const f32| {
                // max/min send NaN to -1 where torch keeps NaN; both land in bucket 0.
                let s = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(p), inv), lo), hi);
                let mut c = _mm256_setzero_si256();
                for m in &mids {
                    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(s, *m)));
                }
                if fp4 {
                    let l = _mm256_permutevar8x32_epi32(order_lo, c);
                    let h = _mm256_permutevar8x32_epi32(order_hi, c);
                    c = _mm256_blendv_epi8(l, h, _mm256_cmpgt_epi32(c, _mm256_set1_epi32(7)));
                }
                c
            };
            for (k, o) in out.chunks_exact_mut(8).enumerate() {
                let a = codes(buf.as_ptr().add(16 * k));
                let b = codes(buf.as_ptr().add(16 * k + 8));
                o.copy_from_slice(&pack16(a, b).to_le_bytes());
            }
        }
    }

    /// Sixteen codes (two vectors of 32-bit lanes) to eight bytes, even elements in the high nibble.
    #[inline(always)]
    unsafe fn pack16(a: __m256i, b: __m256i) -> u64 {
        // 16-bit lanes come out as a0-3 b0-3 | a4-7 b4-7; reorder the 64-bit quarters to 0..16.
        let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
        // Each 32-bit lane holds one pair (low half the even element): make it one byte.
        let pair = _mm256_or_si256(
            _mm256_and_si256(_mm256_slli_epi32::<4>(p), _mm256_set1_epi32(0xF0)),
            _mm256_srli_epi32::<16>(p),
        );
        let gather = _mm256_setr_epi8(
            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1,
            -1, -1, -1,
        );
        let r = _mm256_shuffle_epi8(pair, gather);
        let low = _mm_cvtsi128_si32(_mm256_castsi256_si128(r)) as u32 as u64;
        let high = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(r)) as u32 as u64;
        low | (high << 32)
    }
}

/// `max |x|`. Eight lanes so the loop vectorizes; max is exact, so the order does not matter.
#[inline(always)]
pub(crate) fn max_abs(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = l.max(v.abs());
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |m, v| m.max(v.abs()));
    lanes.iter().fold(tail, |m, &l| m.max(l))
}

/// Dequantizes `n` elements: `code[q] * absmax[block]` in F32, exactly as bitsandbytes' C++ kernels
/// compute it before casting to the output dtype. (Its PyTorch fallback, taken for an odd last
/// dimension, uses `quant_map` instead and so writes FP4 zeros as +0.0.)
pub fn dequantize(packed: &[u8], absmax: &[f32], n: usize, blocksize: usize, qt: QuantType) -> Result<Vec<f32>, Error> {
    check_blocksize(blocksize)?;
    if packed.len() < n.div_ceil(2) {
        return Err(Error::new(format!("{} packed bytes cannot hold {n} 4-bit codes", packed.len())));
    }
    if absmax.len() < n.div_ceil(blocksize) {
        return Err(Error::new(format!("{} absmax values for {} blocks", absmax.len(), n.div_ceil(blocksize))));
    }
    let codes = qt.dequant_codes();
    let mut out = kvant_plugin_api::dense::zeroed(n);
    out.par_chunks_mut(blocksize).zip(absmax.par_iter()).enumerate().for_each(|(b, (dst, &scale))| {
        let bytes = &packed[b * blocksize / 2..];
        for (i, d) in dst.iter_mut().enumerate() {
            let byte = bytes[i / 2];
            let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
            *d = codes[q as usize] * scale;
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvant_plugin_api::DType;

    fn q(values: &[f32], bs: usize, qt: QuantType) -> Quantized4 {
        quantize(Floats::from_f32(values), bs, qt).unwrap()
    }

    #[test]
    fn tables_match_bitsandbytes() {
        let fp4 = QuantType::Fp4.codes();
        assert_eq!(fp4[3], 1.0);
        assert_eq!(fp4[1], 0.0625f32 / 12.0);
        assert_eq!(fp4[8].to_bits(), 0);
        // sorted order really is increasing (ties between +0 and -0 aside)
        let order = QuantType::Fp4.order();
        assert!(order.windows(2).all(|w| fp4[w[0] as usize] <= fp4[w[1] as usize]));
        assert_eq!(QuantType::Nf4.zero_code(), 7);
        assert_eq!(QuantType::Fp4.zero_code(), 0);
    }

    #[test]
    fn midpoint_ties_go_to_the_lower_code() {
        let enc = Encoder::new(QuantType::Nf4);
        let mid = enc.mids[7];
        assert_eq!(enc.code(mid), 7);
        assert_eq!(enc.code(f32::from_bits(mid.to_bits() + 1)), 8);
    }

    #[test]
    fn packs_high_nibble_first_and_pads_odd_counts() {
        let mut w = vec![0f32; 33];
        w[0] = 1.0; // absmax 1 -> code 15
        w[1] = -1.0; // code 0
        w[32] = 0.5; // last partial block of one element: itself its absmax
        let r = q(&w, 32, QuantType::Nf4);
        assert_eq!(r.packed.len(), 17);
        assert_eq!(r.packed[0], 0xF0);
        assert_eq!(r.packed[16], 0xF7);
        assert_eq!(r.absmax, [1.0, 0.5]);
    }

    #[test]
    fn zero_blocks_store_zero_or_the_clamp() {
        let r = q(&[0.0; 40], 32, QuantType::Nf4);
        assert_eq!(r.absmax[0], 0.0);
        // the partial block stores the clamped absmax, as torch's clamp(min=1e-38) leaves it
        assert_eq!(r.absmax[1].to_bits(), 0x006C_E3EE);
        assert!(r.packed.iter().all(|&b| b == 0x77));
    }

    /// The AVX2 block kernel writes the same bytes as the portable loop, for every input dtype.
    #[test]
    fn block_kernels_agree() {
        let w: Vec<f32> = (0..4096).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0 * if i % 97 == 0 { 9.0 } else { 1.0 }).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let bytes = crate::input::encode(&w, dtype).unwrap();
            let src = Floats::new(dtype, &bytes).unwrap();
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for bs in [32, 64, 256, 4096] {
                    let enc = Encoder::new(qt);
                    let (mut p1, mut a1) = (vec![0u8; 2048], vec![0f32; 4096 / bs]);
                    full_blocks_generic(src, 0, bs, &enc, &mut p1, &mut a1);
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
                        let (mut p2, mut a2) = (vec![0u8; 2048], vec![0f32; 4096 / bs]);
                        unsafe { avx2::full_blocks(src, 0, bs, &enc, qt == QuantType::Fp4, &mut p2, &mut a2) };
                        assert_eq!(p1, p2, "{dtype} {qt:?} {bs}");
                        assert_eq!(a1, a2);
                    }
                }
            }
        }
    }

    #[test]
    fn dequantize_inverts_codes() {
        let w: Vec<f32> = (0..100).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let r = q(&w, 64, QuantType::Fp4);
        let d = dequantize(&r.packed, &r.absmax, w.len(), 64, QuantType::Fp4).unwrap();
        let err: f32 = w.iter().zip(&d).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err <= 0.5 * r.absmax[0], "max error {err}");
        assert!(check_blocksize(48).is_err() && check_blocksize(8192).is_err());
    }
}
