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
    fn group_params(&self, values: &[f32]) -> (f32, u8) {
        let maxq = self.maxq();
        let (lo, hi) = values.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
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
        let rows: Vec<(Vec<u8>, Vec<f32>, Vec<u8>)> = w
            .par_chunks(self.inp)
            .map(|row| {
                let mut bytes = vec![0u8; self.row_bytes];
                let mut scales = Vec::with_capacity(self.groups);
                let mut zeros = Vec::with_capacity(self.groups);
                for (g, chunk) in row.chunks(self.group).enumerate() {
                    let (scale, zero) = self.group_params(chunk);
                    for (j, &v) in chunk.iter().enumerate() {
                        let q = ((v / scale).round() + zero as f32).clamp(0.0, maxq) as u32;
                        put_code(&mut bytes, g * self.group + j, self.params.bits, q);
                    }
                    scales.push(scale);
                    zeros.push(zero);
                }
                (bytes, scales, zeros)
            })
            .collect();
        let mut packed = Packed { qweight: Vec::new(), scales: Vec::new(), zeros: Vec::new() };
        for (bytes, scales, zeros) in rows {
            packed.qweight.extend(bytes);
            packed.scales.extend(scales);
            if !self.params.sym {
                packed.zeros.extend(zeros);
            }
        }
        packed
    }

    /// Dense row `o` of the weight.
    pub fn dequantize_row(&self, p: &Packed, o: usize) -> Vec<f32> {
        let bytes = &p.qweight[o * self.row_bytes..(o + 1) * self.row_bytes];
        let sym_zero = 1u32 << (self.params.bits - 1);
        (0..self.inp)
            .map(|i| {
                let g = o * self.groups + i / self.group;
                let zero = if self.params.sym { sym_zero } else { p.zeros[g] as u32 };
                (get_code(bytes, i, self.params.bits) as f32 - zero as f32) * p.scales[g]
            })
            .collect()
    }

    /// The dense `[out, inp]` weight.
    pub fn dequantize(&self, p: &Packed) -> Vec<f32> {
        (0..self.out).into_par_iter().flat_map_iter(|o| self.dequantize_row(p, o)).collect()
    }
}

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
