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
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { full_blocks_avx2(src, start, bs, enc, qt, bytes, amax) };
    }
    full_blocks_generic(src, start, bs, enc, qt, bytes, amax)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn full_blocks_avx2(src: Floats<'_>, start: usize, bs: usize, enc: &Encoder, qt: QuantType, bytes: &mut [u8], amax: &mut [f32]) {
    full_blocks_generic(src, start, bs, enc, qt, bytes, amax)
}

/// Full blocks `start / bs ..`, one per entry of `amax`; inlined into each instruction-set variant.
#[inline(always)]
fn full_blocks_generic(src: Floats<'_>, start: usize, bs: usize, enc: &Encoder, qt: QuantType, bytes: &mut [u8], amax: &mut [f32]) {
    let mut x = [0f32; MAX_BLOCKSIZE];
    let mut codes = [0u8; MAX_BLOCKSIZE];
    let (x, codes) = (&mut x[..bs], &mut codes[..bs]);
    for (b, (out, am)) in bytes.chunks_exact_mut(bs / 2).zip(amax.iter_mut()).enumerate() {
        src.load(start + b * bs, x);
        let m = max_abs(x);
        *am = m;
        let inv = 1.0 / m.max(MIN_ABSMAX);
        for (c, &v) in codes.iter_mut().zip(x.iter()) {
            *c = enc.bucket((v * inv).clamp(-1.0, 1.0));
        }
        if qt == QuantType::Fp4 {
            codes.iter_mut().for_each(|c| *c = enc.order[*c as usize]);
        }
        for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
            *o = (pair[0] << 4) | pair[1];
        }
    }
}

/// `max |x|`, in an order-free way (max is exact, so any order gives the same result).
#[inline(always)]
fn max_abs(x: &[f32]) -> f32 {
    // Eight lanes so the loop vectorizes; max is associative, so this matches a sequential scan.
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
    let mut out = vec![0f32; n];
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
