//! The `rtn` storage format: group parameters and bit-stream packing, with its tests.

use rayon::prelude::*;

/// The three settings of the method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtnParams {
    /// Bits per code, 2..=8.
    pub bits: u32,
    /// Input values per group; -1 (or anything >= in_features) is one group per row.
    pub group_size: i64,
    /// Symmetric levels (zero point fixed at `2^(bits-1)`), else a zero point per group.
    pub sym: bool,
}

/// Sizes derived from a Linear's shape and the settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Output features (rows of W).
    pub out: usize,
    /// Input features (columns of W).
    pub inp: usize,
    /// The settings.
    pub params: RtnParams,
    /// Effective group width (a row's last group may be shorter).
    pub group: usize,
    /// Groups per row.
    pub groups: usize,
    /// Packed bytes per row.
    pub row_bytes: usize,
}

/// Packed data of one Linear.
pub struct Packed {
    /// `[out, row_bytes]` bit streams.
    pub qweight: Vec<u8>,
    /// `[out, groups]` scales, already rounded to what F16 storage keeps.
    pub scales: Vec<f32>,
    /// `[out, groups]` zero points (empty when symmetric).
    pub zeros: Vec<u8>,
}

impl Layout {
    /// The layout of an `out x inp` weight.
    pub fn new(out: usize, inp: usize, params: RtnParams) -> Self {
        let group = if params.group_size <= 0 { inp } else { (params.group_size as usize).min(inp) }.max(1);
        Layout { out, inp, params, group, groups: inp.div_ceil(group), row_bytes: (inp * params.bits as usize).div_ceil(8) }
    }

    fn maxq(&self) -> f32 {
        ((1u32 << self.params.bits) - 1) as f32
    }

    /// Scale and zero point of one group. The scale is rounded to F16 first, so that the codes
    /// are chosen for the scale that is actually stored.
    #[inline(always)]
    fn group_params(&self, values: &[f32]) -> (f32, u8) {
        let maxq = self.maxq();
        let (lo, hi) = min_max(values);
        if self.params.sym {
            let zero = (1u32 << (self.params.bits - 1)) as f32;
            let amax = lo.abs().max(hi);
            // The largest magnitude maps to +-(zero-1), so both signs are representable and
            // code 0 (= -zero) is spare.
            let scale = round_f16(if amax == 0.0 { 1.0 } else { amax / (zero - 1.0) });
            (scale, zero as u8)
        } else {
            let scale = round_f16(if hi == lo { 1.0 } else { (hi - lo) / maxq });
            let zero = (-lo / scale).round().clamp(0.0, maxq);
            (scale, zero as u8)
        }
    }

    /// Quantizes a row-major `[out, inp]` weight.
    pub fn quantize(&self, w: &[f32]) -> Packed {
        assert_eq!(w.len(), self.out * self.inp);
        let maxq = self.maxq();
        let mut packed = Packed {
            qweight: vec![0u8; self.out * self.row_bytes],
            scales: vec![0f32; self.out * self.groups],
            zeros: vec![0u8; self.out * self.groups],
        };
        let params = packed.scales.par_chunks_mut(self.groups).zip(packed.zeros.par_chunks_mut(self.groups));
        w.par_chunks(self.inp).zip(packed.qweight.par_chunks_mut(self.row_bytes)).zip(params).for_each_init(
            || vec![0u8; self.inp],
            |codes, ((row, bytes), (scales, zeros))| self.quantize_row(row, codes, bytes, scales, zeros, maxq),
        );
        if self.params.sym {
            packed.zeros = Vec::new();
        }
        packed
    }

    /// One row: its groups' scales and zero points, its codes (`codes` is scratch), packed.
    fn quantize_row(&self, row: &[f32], codes: &mut [u8], bytes: &mut [u8], scales: &mut [f32], zeros: &mut [u8], maxq: f32) {
        // The same code compiled for AVX2 where the CPU has it: twice the lanes of the baseline.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.quantize_row_avx2(row, codes, bytes, scales, zeros, maxq) };
        }
        self.quantize_row_lanes(row, codes, bytes, scales, zeros, maxq)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_row_avx2(&self, row: &[f32], codes: &mut [u8], bytes: &mut [u8], scales: &mut [f32], zeros: &mut [u8], maxq: f32) {
        self.quantize_row_lanes(row, codes, bytes, scales, zeros, maxq)
    }

    #[inline(always)]
    fn quantize_row_lanes(&self, row: &[f32], codes: &mut [u8], bytes: &mut [u8], scales: &mut [f32], zeros: &mut [u8], maxq: f32) {
        let groups = row.chunks(self.group).zip(codes.chunks_mut(self.group));
        for (g, (values, codes)) in groups.enumerate() {
            let (scale, zero) = self.group_params(values);
            // Locals, not captures: byte stores may alias a captured value, which would
            // be reloaded at every element and keep the loop scalar.
            let (zero_f, maxq) = (zero as f32, maxq);
            for (c, &v) in codes.iter_mut().zip(values) {
                *c = to_byte((round_half_away(v / scale) + zero_f).max(0.0).min(maxq));
            }
            scales[g] = scale;
            zeros[g] = zero;
        }
        pack_row(codes, self.params.bits, bytes);
    }

    /// Decodes row `o` of the weight into `row` (`inp` values).
    pub fn dequantize_row_into(&self, p: &Packed, o: usize, row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.dequantize_row_avx2(p, o, row) };
        }
        self.dequantize_row_lanes(p, o, row)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn dequantize_row_avx2(&self, p: &Packed, o: usize, row: &mut [f32]) {
        self.dequantize_row_lanes(p, o, row)
    }

    #[inline(always)]
    fn dequantize_row_lanes(&self, p: &Packed, o: usize, row: &mut [f32]) {
        let bytes = &p.qweight[o * self.row_bytes..(o + 1) * self.row_bytes];
        unpack_row(bytes, self.params.bits, row);
        let sym_zero = (1u32 << (self.params.bits - 1)) as f32;
        for (g, values) in row.chunks_mut(self.group).enumerate() {
            let i = o * self.groups + g;
            let zero = if self.params.sym { sym_zero } else { p.zeros[i] as f32 };
            let scale = p.scales[i];
            for v in values {
                *v = (*v - zero) * scale;
            }
        }
    }

    /// Dense row `o` of the weight.
    pub fn dequantize_row(&self, p: &Packed, o: usize) -> Vec<f32> {
        let mut row = vec![0f32; self.inp];
        self.dequantize_row_into(p, o, &mut row);
        row
    }

    /// The dense `[out, inp]` weight.
    pub fn dequantize(&self, p: &Packed) -> Vec<f32> {
        let mut w = kvant_plugin_api::dense::zeroed(self.out * self.inp);
        w.par_chunks_mut(self.inp.max(1)).enumerate().for_each(|(o, row)| self.dequantize_row_into(p, o, row));
        w
    }
}

/// Smallest and largest value, each clamped towards 0 (the range always holds 0). Eight
/// independent lanes so that the loop vectorises; NaNs are skipped, as `f32::min` would.
#[inline(always)]
fn min_max(values: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([0f32; 8], [0f32; 8]);
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            lo[k] = if c[k] < lo[k] { c[k] } else { lo[k] };
            hi[k] = if c[k] > hi[k] { c[k] } else { hi[k] };
        }
    }
    let fold = |(l, h): (f32, f32), &v: &f32| (l.min(v), h.max(v));
    let lanes = lo.iter().zip(&hi).fold((0f32, 0f32), |(l, h), (&a, &b)| (l.min(a), h.max(b)));
    chunks.remainder().iter().fold(lanes, fold)
}

/// 2^23: every f32 from here on is an integer, and adding it to a smaller one rounds that one.
const INTEGRAL: f32 = 8388608.0;

/// `f32::round` (half away from zero) in plain float operations, so that the loop around it
/// vectorises; the libm call and saturating `as` conversions do not.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let a = x.abs();
    let even = (a + INTEGRAL) - INTEGRAL;
    let r = if a - even == 0.5 { even + 1.0 } else { even };
    (if a < INTEGRAL { r } else { a }).copysign(x)
}

/// An integral `v` in 0..=255 as a byte: the low mantissa bits of `v + 2^23` (vectorises, unlike
/// `as u8`). NaN gives 0, as `as` does.
#[inline(always)]
fn to_byte(v: f32) -> u8 {
    (v + INTEGRAL).to_bits() as u8
}

/// Packs one row of codes into its bit stream; 8, 4 and 2 bits take whole bytes at a time.
#[inline(always)]
fn pack_row(codes: &[u8], bits: u32, bytes: &mut [u8]) {
    match bits {
        8 => bytes.copy_from_slice(codes),
        4 => {
            let mut pairs = codes.chunks_exact(2);
            for (b, c) in bytes.iter_mut().zip(&mut pairs) {
                *b = c[0] | c[1] << 4;
            }
            if let [last] = pairs.remainder() {
                bytes[bytes.len() - 1] = *last;
            }
        }
        2 => {
            for (b, c) in bytes.iter_mut().zip(codes.chunks(4)) {
                *b = c.iter().rev().fold(0u8, |acc, &q| (acc << 2) | q);
            }
        }
        _ => {
            for (i, &c) in codes.iter().enumerate() {
                put_code(bytes, i, bits, c as u32);
            }
        }
    }
}

/// Unpacks one row's bit stream into code values.
#[inline(always)]
fn unpack_row(bytes: &[u8], bits: u32, row: &mut [f32]) {
    match bits {
        8 => row.iter_mut().zip(bytes).for_each(|(v, &b)| *v = b as f32),
        4 => {
            let mut pairs = row.chunks_exact_mut(2);
            for (pair, &b) in (&mut pairs).zip(bytes) {
                pair[0] = (b & 15) as f32;
                pair[1] = (b >> 4) as f32;
            }
            if let [last] = pairs.into_remainder() {
                *last = (bytes[bytes.len() - 1] & 15) as f32;
            }
        }
        _ => row.iter_mut().enumerate().for_each(|(i, v)| *v = get_code(bytes, i, bits) as f32),
    }
}

#[inline(always)]
fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Writes `code` at position `i` of a little-endian bit stream.
fn put_code(bytes: &mut [u8], i: usize, bits: u32, code: u32) {
    let bit = i * bits as usize;
    let word = (code as u16) << (bit % 8);
    bytes[bit / 8] |= word as u8;
    if bit % 8 + bits as usize > 8 {
        bytes[bit / 8 + 1] |= (word >> 8) as u8;
    }
}

/// Reads the code at position `i` of a little-endian bit stream.
fn get_code(bytes: &[u8], i: usize, bits: u32) -> u32 {
    let bit = i * bits as usize;
    let lo = bytes[bit / 8] as u16;
    let hi = if bit % 8 + bits as usize > 8 { bytes[bit / 8 + 1] as u16 } else { 0 };
    (((hi << 8) | lo) >> (bit % 8)) as u32 & ((1 << bits) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(bits: u32, group_size: i64, sym: bool) -> RtnParams {
        RtnParams { bits, group_size, sym }
    }

    /// Deterministic, roughly Gaussian values.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let mut acc = 0.0;
                for _ in 0..4 {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                acc
            })
            .collect()
    }

    #[test]
    fn bit_stream_round_trips_every_width() {
        for bits in 2..=8 {
            let codes: Vec<u32> = (0..37).map(|i| (i * 7 + 3) % (1 << bits)).collect();
            let mut bytes = vec![0u8; (37 * bits as usize).div_ceil(8)];
            for (i, &c) in codes.iter().enumerate() {
                put_code(&mut bytes, i, bits, c);
            }
            let back: Vec<u32> = (0..37).map(|i| get_code(&bytes, i, bits)).collect();
            assert_eq!(back, codes, "bits {bits}");
        }
    }

    #[test]
    fn whole_byte_paths_match_the_bit_stream() {
        for bits in [2, 4, 8] {
            for n in [1, 6, 7, 37] {
                let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
                let mut fast = vec![0u8; (n * bits as usize).div_ceil(8)];
                pack_row(&codes, bits, &mut fast);
                let mut slow = vec![0u8; fast.len()];
                for (i, &c) in codes.iter().enumerate() {
                    put_code(&mut slow, i, bits, c as u32);
                }
                assert_eq!(fast, slow, "bits {bits}, {n} codes");
                let mut back = vec![0f32; n];
                unpack_row(&fast, bits, &mut back);
                assert!(back.iter().zip(&codes).all(|(&v, &c)| v == c as f32), "bits {bits}, {n} codes");
            }
        }
    }

    #[test]
    fn the_avx2_build_gives_the_same_bytes_and_values() {
        let w = weights(3 * 300, 11);
        for bits in 2..=8 {
            for sym in [false, true] {
                let l = Layout::new(3, 300, params(bits, 64, sym));
                let maxq = ((1u32 << bits) - 1) as f32;
                let dispatched = l.quantize(&w);
                let mut codes = vec![0u8; l.inp];
                for (o, row) in w.chunks(l.inp).enumerate() {
                    let (mut bytes, mut scales, mut zeros) = (vec![0u8; l.row_bytes], vec![0f32; l.groups], vec![0u8; l.groups]);
                    l.quantize_row_lanes(row, &mut codes, &mut bytes, &mut scales, &mut zeros, maxq);
                    assert_eq!(bytes, dispatched.qweight[o * l.row_bytes..(o + 1) * l.row_bytes], "bits {bits} sym {sym} row {o}");
                    assert_eq!(scales, dispatched.scales[o * l.groups..(o + 1) * l.groups]);
                    let mut a = vec![0f32; l.inp];
                    let mut b = vec![0f32; l.inp];
                    l.dequantize_row_into(&dispatched, o, &mut a);
                    l.dequantize_row_lanes(&dispatched, o, &mut b);
                    assert_eq!(a, b, "bits {bits} sym {sym} row {o}");
                }
            }
        }
    }

    #[test]
    fn round_half_away_is_f32_round() {
        let edges = [0.49999997, -0.49999997, 2.5000002, 1e-30, -0.0, 8388607.5, -8388609.0, 3e9, f32::INFINITY];
        for x in (-2000..=2000).map(|i| i as f32 / 8.0).chain(edges) {
            // == and not bits: the sign of a zero is lost, and does not matter once the zero point is added.
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
        assert!((0..=255).all(|b| to_byte(b as f32) == b as u8));
        assert_eq!(to_byte(f32::NAN), f32::NAN as u8);
    }

    #[test]
    fn packing_is_lsb_first() {
        let mut bytes = [0u8; 2];
        put_code(&mut bytes, 0, 4, 0x3);
        put_code(&mut bytes, 1, 4, 0xA);
        put_code(&mut bytes, 2, 4, 0x1);
        assert_eq!(bytes, [0xA3, 0x01]);
    }

    #[test]
    fn short_last_group_and_shapes() {
        let l = Layout::new(3, 576, params(4, 128, false));
        assert_eq!((l.group, l.groups, l.row_bytes), (128, 5, 288));
        let l = Layout::new(3, 10, params(3, -1, true));
        assert_eq!((l.group, l.groups, l.row_bytes), (10, 1, 4));
    }

    #[test]
    fn grid_values_are_reproduced_exactly() {
        // Values already on a 4-bit grid with an F16-exact scale come back unchanged.
        let w: Vec<f32> = (0..64).map(|i| ((i % 16) as f32 - 5.0) * 0.25).collect();
        let l = Layout::new(2, 32, params(4, 16, false));
        assert_eq!(l.dequantize(&l.quantize(&w)), w);
    }

    #[test]
    fn error_shrinks_with_bits_and_stays_in_range() {
        let w = weights(64 * 300, 7);
        let mut last = f64::INFINITY;
        for bits in 2..=8 {
            for sym in [false, true] {
                let l = Layout::new(64, 300, params(bits, 64, sym));
                let back = l.dequantize(&l.quantize(&w));
                let err = kvant_plugin_api::dense::relative_error(&back, &w);
                // Rounding error is step/sqrt(12), relative to the weights' sigma; a group of 64
                // of these values spans under 6 sigma (max magnitude under 3 sigma).
                let step = if sym { 3.0 / ((1 << (bits - 1)) - 1) as f64 } else { 6.0 / ((1 << bits) - 1) as f64 };
                assert!(err < step / 12f64.sqrt(), "bits {bits} sym {sym}: {err}");
                if !sym {
                    assert!(err < last, "bits {bits}: {err} !< {last}");
                    last = err;
                }
            }
        }
    }

    #[test]
    fn zero_rows_are_exact_and_constant_rows_lose_only_scale_rounding() {
        let mut w = vec![0f32; 2 * 40];
        w[40..].fill(0.5);
        for sym in [false, true] {
            let l = Layout::new(2, 40, params(4, 16, sym));
            let back = l.dequantize(&l.quantize(&w));
            assert!(back[..40].iter().all(|&v| v == 0.0), "sym {sym}");
            // The range includes 0, so 0.5 is the top level; only the F16 scale rounds.
            assert!(back[40..].iter().all(|&v| (v - 0.5).abs() < 0.5 / 1024.0), "sym {sym}: {:?}", &back[40..44]);
        }
    }
}
